"""Issue 12 section 5: exit 1 means only "gate failed / file invalid"; every unusable input or environment fault is
exit 2 with ONE `error:` line of sane length, never a traceback (QUANTGATE_DEBUG=1 adds it).

Real inputs and real faults: deeply nested JSON, broken config.json files, a full and a read-only filesystem
(tmpfs mounts), `ulimit -f`, file names over NAME_MAX, corrupted audit rows in a real SQLite audit database,
an unreachable Redis, and a real Redis for the submit noise check.
"""
from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from tests.validation._tiny import make_tiny_model, quantize_to, write_samples

ROOT = Path(__file__).resolve().parents[2]
DEEP = "[" * 100_000 + "]" * 100_000


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600, preexec=None
        ) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200", **(env or {})}
    if "QUANTGATE_DEBUG" not in (env or {}):
        e.pop("QUANTGATE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec)


def assert_one_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, no traceback, and the `error:` line is the last line of stderr, one line, at most ~520 chars."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, r.stderr[-3000:]
    assert r.stderr.rstrip("\n").splitlines()[-1] == errors[0], r.stderr[-3000:]
    assert len(errors[0]) <= 520, len(errors[0])
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("exit")
    model = make_tiny_model(d / "model")
    q8 = quantize_to(model, d / "q8.gguf", "Q8_0")
    write_samples(d / "eval.jsonl")
    (d / "deep.json").write_text(DEEP)
    (d / "deep.jsonl").write_text(json.dumps({"id": "a", "category": "c", "text": "x", "source": "s"})[:-1]
                                  + ', "deep": ' + DEEP + "}\n")
    (d / "list.json").write_text("[]\n")
    return {"dir": d, "model": model, "q8": q8}


# ------------------------------------------------------------------------------------------------ the mapping


def test_error_message_mapping_in_process():
    from core.errors import CheckpointError
    from quantgate.cli_app import error_message

    assert error_message(CheckpointError("bad")) == "bad"
    assert error_message(FileNotFoundError(errno.ENOENT, "No such file", "/x")) == "file not found: /x"
    assert error_message(OSError(errno.ENOSPC, "No space left on device", "/o")).startswith(
        "No space left on device [ENOSPC]: /o")
    assert "[EROFS]" in error_message(OSError(errno.EROFS, "Read-only file system", "/o"))
    assert "ulimit -f" in error_message(OSError(errno.EFBIG, "File too large", "/o"))
    assert "RecursionError" in error_message(RecursionError("maximum recursion depth exceeded"))
    assert error_message(MemoryError()) == "out of memory"
    assert error_message(json.JSONDecodeError("Expecting value", "x", 0)).startswith("invalid input (JSONDecodeError)")
    m = error_message(AttributeError("'list' object has no attribute 'get'"))
    assert m.startswith("internal error: AttributeError") and "QUANTGATE_DEBUG=1" in m


# ------------------------------------------------------------------------------------------------ nested JSON


def test_deeply_nested_json_manifest_and_dataset(env):
    d = env["dir"]
    common = ["validate", "-b", str(env["model"]), "--quantized", str(env["q8"]), "--threshold", "1", "--metric", "kl_mean",
              "--max-tokens", "16", "--no-expectations", "--report-dir", "r"]
    assert_one_error(cli(*common, "--manifest", "deep.json", cwd=d), "nested too deeply")
    assert_one_error(cli(*common, "-d", "deep.jsonl", cwd=d), "nested too deeply")


def test_verdict_json_nested_and_not_an_object(env, tmp_path):
    d = env["dir"]
    reg = {"QUANTGATE_STORE_DIR": str(tmp_path / "store")}
    assert_one_error(cli("register", str(env["q8"]), "--verdict", "deep.json", cwd=d, env=reg), "deep.json")
    assert_one_error(cli("register", str(env["q8"]), "--verdict", "list.json", cwd=d, env=reg))


# ------------------------------------------------------------------------------------------------ config.json


@pytest.mark.parametrize("key,value", [
    ("hidden_size", "1e400"),             # a JSON number that overflows to inf
    ("num_attention_heads", 0),
    ("num_attention_heads", -4),
    ("num_key_value_heads", 0),
    ("hidden_size", 250),                  # not divisible by 4 heads
    ("num_hidden_layers", "abc"),
    ("intermediate_size", -1),
])
def test_broken_config_json(env, tmp_path, key, value):
    m = tmp_path / "m"
    shutil.copytree(env["model"], m)
    cfg = (m / "config.json").read_text()
    data = json.loads(cfg)
    data[key] = "__V__"
    text = json.dumps(data).replace('"__V__"', value if isinstance(value, str) and value[0].isdigit()
                                    else json.dumps(value))
    (m / "config.json").write_text(text)
    r = cli("quantize", "-m", str(m), "-p", "Q8_0", "-o", str(tmp_path / "o.gguf"), cwd=tmp_path)
    # Whether a value is refused is quant/model_plan.py's hparam validation; here: when it is (or anything else
    # breaks on it), the result is one error line and exit 2, never a traceback or exit 1.
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    if r.returncode != 0:
        assert_one_error(r)
        assert not (tmp_path / "o.gguf").exists()


# ------------------------------------------------------------------------------------------------ the filesystem


@pytest.fixture
def tmpfs(tmp_path):
    """mount(kind) -> a fresh tmpfs: "small" (300 KiB) or "ro" (read-only); unmounted afterwards."""
    mounts = []

    def mount(kind: str) -> Path:
        p = tmp_path / f"mnt-{kind}"
        p.mkdir()
        opts = "size=300k" if kind == "small" else "ro,size=1m"
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(p)], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounts.append(p)
        return p

    yield mount
    for p in mounts:
        subprocess.run(["umount", str(p)], capture_output=True)


def test_disk_full_during_quantize(env, tmpfs):
    out = tmpfs("small") / "o.gguf"
    r = cli("quantize", "-m", str(env["model"]), "-p", "F16", "-o", str(out), cwd=env["dir"])
    assert_one_error(r, "[ENOSPC]")
    assert list(out.parent.iterdir()) == []            # atomic write: no partial file, no temp file left


def test_read_only_filesystem(env, tmpfs):
    out = tmpfs("ro") / "o.gguf"
    assert_one_error(cli("quantize", "-m", str(env["model"]), "-p", "Q8_0", "-o", str(out), cwd=env["dir"]),
                     "[EROFS]")


def test_ulimit_f_raises_efbig_not_sigxfsz(env, tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "o.gguf"
    r = cli("quantize", "-m", str(env["model"]), "-p", "F16", "-o", str(out), cwd=tmp_path, preexec=limit)
    assert r.returncode != -25, "killed by SIGXFSZ"
    assert_one_error(r, "[EFBIG]", "ulimit -f")
    assert list(tmp_path.glob("*o.gguf*")) == []


def test_file_name_too_long(env, tmp_path):
    r = cli("quantize", "-m", str(env["q8"]), "-p", "Q8_0", "--allow-requantize", "-o", "m" * 5000 + ".gguf",
            cwd=tmp_path)
    line = assert_one_error(r, "[ENAMETOOLONG]")
    assert "more chars]" in line                       # the 5,000-character name is cut, not printed whole


# ------------------------------------------------------------------------------------------------ relative paths


def test_relative_report_dir_with_expectations(env):
    """The README's `--report-dir reports/`: a relative folder used to crash inside Great Expectations."""
    r = cli("validate", "-b", "model", "--quantized", "q8.gguf", "--threshold", "10", "--metric", "kl_mean", "-d",
            "eval.jsonl", "--max-tokens", "16", "--report-dir", "reports/", "--data-docs", cwd=env["dir"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    folder = next((env["dir"] / "reports").iterdir())
    assert (folder / "gx" / "index.html").is_file() and (folder / "validation.md").is_file()
    verdict = json.loads((folder / "verdict.json").read_text())
    assert all(Path(p).is_absolute() for p in verdict["report_paths"].values())


# ------------------------------------------------------------------------------------------------ audit rows


def _create_audit_tables(db) -> None:
    """An empty audit database with its tables, made the way the tool makes it (the first append creates them)."""
    from registry.audit import AuditLog

    with AuditLog(f"sqlite:///{db}"):
        pass


@pytest.mark.parametrize("chain_index,body", [("abc", "{}"), (0, "null"), ("abc", "null")])
def test_corrupted_audit_rows(env, tmp_path, chain_index, body):
    e = {"QUANTGATE_STORE_DIR": str(tmp_path / "store"),
         "QUANTGATE_AUDIT_DB_URL": f"sqlite:///{tmp_path / 'audit.db'}"}
    _create_audit_tables(tmp_path / "audit.db")                # `audit verify` is read-only: it never creates them
    with sqlite3.connect(tmp_path / "audit.db") as c:
        c.execute("insert into quantgate_audit_events(chain_index,event_id,ts,action,model_name,body,prev_hash,hash)"
                  " values (?, 'e1', 't', 'quantize', 'm', ?, 'p1', 'h1')", (chain_index, body))
    for args in (("audit", "verify"), ("audit", "export", "--model", "m", "--no-attach")):
        r = cli(*args, cwd=tmp_path, env=e)
        assert "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.returncode in (1, 2), (args, r.returncode, r.stdout, r.stderr[-2000:])  # tampered, or unusable
        if r.returncode == 2:
            assert_one_error(r)


# ------------------------------------------------------------------------------------------------ debug mode


def test_internal_error_traceback_only_with_quantgate_debug(env, tmp_path):
    """An unexpected exception: one `internal error:` line and the hint; QUANTGATE_DEBUG=1 adds the traceback."""
    e = {"QUANTGATE_STORE_DIR": str(tmp_path / "store"),
         "QUANTGATE_AUDIT_DB_URL": f"sqlite:///{tmp_path / 'audit.db'}"}
    _create_audit_tables(tmp_path / "audit.db")
    with sqlite3.connect(tmp_path / "audit.db") as c:      # a row the audit code does not expect
        c.execute("insert into quantgate_audit_events(chain_index,event_id,ts,action,model_name,body,prev_hash,hash)"
                  " values (0, 'e1', 't', 'quantize', 'm', 'null', 'p1', 'h1')")
    r = cli("audit", "export", "--model", "m", "--no-attach", cwd=tmp_path, env=e)
    if r.returncode == 2 and "internal error" in r.stderr:
        assert_one_error(r, "QUANTGATE_DEBUG=1")
        r = cli("audit", "export", "--model", "m", "--no-attach", cwd=tmp_path, env={**e, "QUANTGATE_DEBUG": "1"})
        assert r.returncode == 2 and "Traceback (most recent call last)" in r.stderr
        assert r.stderr.rstrip().splitlines()[-1].startswith("error: internal error:")
    else:  # the audit code now reports this row itself: still no traceback
        assert "Traceback" not in r.stderr and r.returncode in (0, 1, 2)


# ------------------------------------------------------------------------------------------------ Redis


def test_redis_unreachable_submit_and_status(env):
    e = {"QUANTGATE_BROKER_URL": "redis://:hunter2@127.0.0.1:1/0",   # submit checks the job's paths first
         "QUANTGATE_MODEL_ROOTS": str(env["dir"]), "QUANTGATE_WORKDIR": str(env["dir"] / "jobs")}
    line = assert_one_error(cli("status", "0123abcd", cwd=env["dir"], env=e), "cannot reach the broker")
    assert "hunter2" not in line and "***" in line
    line = assert_one_error(cli("submit", "--model", str(env["model"]), "--mix", "Q8_0", "--no-validate",
                                "--no-register", "--workdir", str(env["dir"] / "jobs"), cwd=ROOT, env=e),
                            "cannot reach the broker")
    assert "hunter2" not in line


def _redis(url: str):
    import redis

    c = redis.Redis.from_url(url, socket_connect_timeout=2)
    try:
        c.ping()
    except Exception as x:  # noqa: BLE001
        pytest.skip(f"no Redis at {url}: {x}")
    return c


def test_submit_prints_only_the_job_id(env):
    """Every successful submit used to end with a 19-line `Exception ignored ... sys.meta_path is None`."""
    url = os.environ.get("QUANTGATE_TEST_REDIS", "redis://127.0.0.1:6379/13")
    c = _redis(url)
    job = None
    try:
        r = cli("submit", "--model", str(env["model"]), "--mix", "Q8_0", "--no-validate", "--no-register",
                "--workdir", str(env["dir"] / "jobs"), cwd=ROOT,
                env={"QUANTGATE_BROKER_URL": url, "QUANTGATE_MODEL_ROOTS": str(env["dir"]),
                     "QUANTGATE_WORKDIR": str(env["dir"] / "jobs")})
        assert r.returncode == 0, r.stderr[-3000:]
        job = r.stdout.strip()
        assert len(job) == 32 and int(job, 16) >= 0, r.stdout
        assert "Exception ignored" not in r.stderr and "meta_path" not in r.stderr, r.stderr
        assert r.stderr.strip() == "", r.stderr
    finally:  # take our messages and keys back out (no worker should run this test's job)
        if job:
            for q in c.keys("*"):
                if c.type(q) == b"list":
                    for item in c.lrange(q, 0, -1):
                        if job.encode() in item:
                            c.lrem(q, 0, item)
            for k in c.keys(f"*{job}*"):
                c.delete(k)

