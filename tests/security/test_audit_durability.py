"""Issue 12 section 6: nothing unaudited, nothing left behind. The quantize audit event is durable before the GGUF
is visible (an unwritable audit DB publishes nothing); temps of writers killed mid-write are removed by the next
write into the folder; `audit verify` never writes; a wiped chain is caught through the anchors MLflow keeps."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.atomic import atomic_write_bytes, clean_stale_temps
from quantgate.sample import SampleShape, make_sample_checkpoint
from registry.audit import GENESIS, AuditLog
from tests.registry.conftest import make_verdict, tiny_artifacts, validated  # noqa: F401 - fixture

ROOT = Path(__file__).resolve().parents[2]
SHAPE = SampleShape(n_layer=1, n_embd=256, n_ff=256, n_vocab=256)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTGATE_", "MLFLOW_"))}
    return {**env, "PYTHONPATH": str(ROOT), **extra}


def _quantize(src: Path, out: Path, audit_url: str, tmp: Path) -> subprocess.CompletedProcess:
    env = _env(QUANTGATE_AUDIT_DB_URL=audit_url, QUANTGATE_STORE_DIR=str(tmp / "store"),
               QUANTGATE_CACHE_DIR=os.environ.get("QUANTGATE_CACHE_DIR", str(tmp / "cache")))
    return subprocess.run([sys.executable, "-m", "quantgate.cli", "quantize", "--model", str(src), "--precision",
                           "Q8_0", "--out", str(out), "--threads", "1"], env=env, cwd=tmp, capture_output=True,
                          text=True, timeout=600)


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return make_sample_checkpoint(tmp_path_factory.mktemp("dur") / "hf", SHAPE, seed=11)


def test_quantize_with_an_unwritable_audit_db_publishes_nothing(checkpoint, tmp_path):
    """Attack/fault: the audit DB cannot be written (its folder is a file; the DB file is garbage). quantize used
    to leave the GGUF at the target, then crash. Now: exit 2, one `error:` line, no GGUF, no temp file. With a
    writable DB the same command publishes the GGUF and its event."""
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (tmp_path / "not-a-dir").write_text("x")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database" * 100)
    for url in (f"sqlite:///{tmp_path / 'not-a-dir' / 'audit.db'}", f"sqlite:///{garbage}"):
        r = _quantize(checkpoint, out_dir / "m.gguf", url, tmp_path)
        assert r.returncode == 2, (r.stdout, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:") and "audit" in lines[0], r.stderr
        assert "Traceback" not in r.stderr
        assert not (out_dir / "m.gguf").exists() and _temps(out_dir) == []
    good = f"sqlite:///{tmp_path / 'audit.db'}"
    r = _quantize(checkpoint, out_dir / "m.gguf", good, tmp_path)
    assert r.returncode == 0, r.stderr
    with AuditLog(good) as log:
        ev = log.events()
    assert [e.action for e in ev] == ["quantize"] and ev[0].outputs[0]["path"] == str(out_dir / "m.gguf")
    assert _temps(out_dir) == []


def test_the_audit_event_is_appended_before_the_gguf_is_visible(checkpoint, tmp_path):
    """quant.gguf_writer.write_gguf's before_publish hook (where the pipeline audits) runs with the bytes in the
    temp file and the target still absent; if it raises, nothing is published."""
    from quant.gguf_writer import TensorSpec, write_gguf
    import numpy as np

    target = tmp_path / "w.gguf"
    seen = {}

    def hook(res):
        seen["visible"] = target.exists()
        seen["temps"] = _temps(tmp_path)
        seen["sha"] = res.sha256

    spec = [TensorSpec("t", (32,), "F32", lambda: np.arange(32, dtype=np.float32).view(np.uint8))]
    res = write_gguf(target, kv=[], tensors=spec, before_publish=hook)
    assert seen["visible"] is False and len(seen["temps"]) == 1 and seen["sha"] == res.sha256
    assert seen["temps"][0].startswith(".w.gguf.") and f"-{os.getpid()}." in seen["temps"][0]

    def failing(_res):
        raise RuntimeError("audit down")

    with pytest.raises(RuntimeError):
        write_gguf(tmp_path / "x.gguf", kv=[], tensors=spec, before_publish=failing)
    assert not (tmp_path / "x.gguf").exists() and _temps(tmp_path) == []


_WRITER = """
import sys, time
from core.atomic import atomic_write
with atomic_write(sys.argv[1]) as f:
    f.write(b"x" * 4096)
    f.flush()
    print("ready", flush=True)
    time.sleep(120)
"""


def _start_writer(target: Path) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], env=_env(), stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_temps_of_killed_writers_are_removed_by_the_next_write(tmp_path, sig):
    """Fault: a writer killed mid-write leaves .NAME.*.tmp. The temp names its host and PID; the next atomic write
    into that folder removes temps of dead writers on this host, and never a live writer's, another host's or an
    old-style temp whose writer it cannot know."""
    dead = _start_writer(tmp_path / "a.gguf")
    dead.send_signal(sig)
    dead.wait(30)
    leftover = _temps(tmp_path)
    assert len(leftover) == 1 and leftover[0].startswith(".a.gguf.") and f"-{dead.pid}." in leftover[0]
    live = _start_writer(tmp_path / "b.gguf")
    try:
        live_tmp = [n for n in _temps(tmp_path) if f"-{live.pid}." in n]
        foreign = tmp_path / ".c.gguf.0badc0de-1.abc123.tmp"   # another host's writer (shared storage)
        old = tmp_path / ".d.gguf.k2j3h4g5.tmp"               # a temp from before PID naming
        foreign.write_bytes(b"?")
        old.write_bytes(b"?")
        atomic_write_bytes(tmp_path / "next.json", b"{}")
        assert _temps(tmp_path) == sorted([live_tmp[0], foreign.name, old.name])
        assert (tmp_path / "next.json").read_bytes() == b"{}"
        assert clean_stale_temps(tmp_path) == []
    finally:
        live.kill()
        live.wait(30)
    assert [p.name for p in clean_stale_temps(tmp_path)] == live_tmp


def _dump(db: Path) -> list[str]:
    con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def _verify(db: Path, tmp_path: Path, *args: str):
    from quantgate.cli import app

    env = {"QUANTGATE_AUDIT_DB_URL": f"sqlite:///{db}", "QUANTGATE_MLFLOW_URI": f"sqlite:///{tmp_path / 'none.db'}"}
    return CliRunner().invoke(app, ["audit", "verify", *args], env=env)


def test_audit_verify_never_writes(tmp_path):
    """Fault: `audit verify` opened the trail read-write: it recreated a deleted head row and dropped tables (and an
    empty database) and then reported the chain intact. Now it opens SQLite read-only, reports each, and the
    database is byte-for-byte what it was."""
    db = tmp_path / "audit.db"
    with AuditLog(f"sqlite:///{db}") as log:
        for i in range(3):
            log.append("quantize", artifact_sha256=f"{i:064x}", detail=str(i))
    assert _verify(db, tmp_path).exit_code == 0
    con = sqlite3.connect(db)
    con.execute("DELETE FROM quantgate_audit_head")
    con.commit()
    con.close()
    before = _dump(db)
    r = _verify(db, tmp_path)
    assert r.exit_code == 1 and "head row is missing" in r.output, r.output
    assert _dump(db) == before
    con = sqlite3.connect(db)
    con.execute("DROP TABLE quantgate_audit_events")
    con.commit()
    con.close()
    before = _dump(db)
    r = _verify(db, tmp_path)
    assert r.exit_code == 1 and "quantgate_audit_events missing" in r.output, r.output
    assert _dump(db) == before and not any("CREATE TABLE quantgate_audit_events" in s for s in before)
    gone = tmp_path / "gone.db"
    r = _verify(gone, tmp_path)
    assert r.exit_code == 1 and "no audit database" in r.output and not gone.exists()


def test_a_wiped_chain_is_caught_by_the_anchors_mlflow_keeps(tiny_artifacts, tmp_path, monkeypatch):  # noqa: F811
    """Attack: audit-DB write access deletes every event and resets the head: the chain alone reads "intact: 0
    events". The version tag and run tag `audit_event_hash` written at registration name events the chain lacks:
    `audit verify` exits 1 and names the version."""
    from quantgate.cli import app
    from registry.config import RegistrySettings
    from registry.registration import register_gguf

    store = tmp_path / "mlruns-store"
    uri = f"sqlite:///{store / 'mlflow.db'}"
    env = {"QUANTGATE_STORE_DIR": str(store), "QUANTGATE_MLFLOW_URI": uri, "MLFLOW_REGISTRY_URI": uri,
           "QUANTGATE_AUDIT_DB_URL": f"sqlite:///{store / 'audit.db'}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    s = RegistrySettings.from_env()
    _, _, q4, _ = tiny_artifacts
    rv = register_gguf(q4.path, settings=s, verdict=validated(make_verdict(q4, True), s.audit_db_url), artifact=q4,
                       model_name="wiped")
    runner = CliRunner()
    assert runner.invoke(app, ["audit", "verify"]).exit_code == 0
    con = sqlite3.connect(store / "audit.db")
    con.execute("DELETE FROM quantgate_audit_events")
    con.execute("UPDATE quantgate_audit_head SET chain_index = -1, hash = ?", (GENESIS,))
    con.commit()
    con.close()
    r = runner.invoke(app, ["audit", "verify", "--chain-only"])
    assert r.exit_code == 0 and "intact: 0 events" in r.output  # the chain alone cannot tell
    r = runner.invoke(app, ["audit", "verify"])
    assert r.exit_code == 1, r.output
    assert f"wiped v{rv.version}'s version tag anchors audit event" in r.output
    assert f"wiped v{rv.version}'s run tag anchors audit event" in r.output
