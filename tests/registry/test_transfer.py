"""Byte progress of registry uploads (registry.transfer.watch_upload: /proc offsets of the staged copy and the
upload) on a real embedded store, and of the CLI's `register` off a terminal."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from registry.registration import register_gguf
from registry.transfer import open_files


@pytest.mark.skipif(not Path("/proc/self/fdinfo").is_dir(), reason="reads /proc (Linux)")
def test_open_files_sees_a_file_being_written_and_read(tmp_path):
    p = tmp_path / "x.gguf"
    with open(p, "wb") as w:
        w.write(b"a" * 5000)
        w.flush()
        with open(p, "rb", buffering=0) as r:
            r.read(1234)
            got = {(m, n) for path, m, n in open_files({"x.gguf"}, set()) if path == str(p)}
            assert got == {("w", 5000), ("r", 1234)}
            assert open_files({"x.gguf"}, {str(p)}) == []  # the source itself is excluded
    assert open_files({"nothing-open.gguf"}, set()) == []


def test_register_reports_staging_then_upload_bytes(store):
    seen = []
    art = store.art_pass
    rv = register_gguf(art.path, settings=store.settings, artifact=art, model_name="progress-probe",
                       progress=lambda d, t, w: seen.append((d, t, w)))
    assert rv.created
    name = Path(art.path).name
    assert seen[0] == (0, art.nbytes, f"upload {name} (staging)")
    assert seen[-1] == (art.nbytes, art.nbytes, f"upload {name} (uploaded)")
    assert all(t == art.nbytes and 0 <= d <= t for d, t, _ in seen)
    again = []
    register_gguf(art.path, settings=store.settings, artifact=art, model_name="progress-probe",
                  progress=lambda *a: again.append(a))
    assert again == []  # already registered: nothing is uploaded, nothing reported


@pytest.mark.parametrize("quiet", [False, True])
def test_cli_register_prints_plain_upload_lines_off_a_terminal(store, monkeypatch, quiet):
    from typer.testing import CliRunner

    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_STORE_DIR", str(store.settings.store_dir))
    monkeypatch.setattr("quantgate.transfer_view.PLAIN_MIN_BYTES", 0)  # the tiny GGUF stands in for a large one
    for var in ("QUANTGATE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "QUANTGATE_AUDIT_DB_URL"):
        monkeypatch.delenv(var, raising=False)
    art = store.art_fail
    r = CliRunner().invoke(app, ["register", str(art.path), "--model-name", f"cli-progress-{int(quiet)}",
                                 "--no-compliance"] + (["--quiet"] if quiet else []))
    assert r.exit_code == 0, r.output
    name = os.path.basename(art.path)
    mib = f"{art.nbytes / 2**20:.1f} MiB"
    lines = [ln for ln in r.output.splitlines() if ln.startswith(f"upload {name}")]
    if quiet:
        assert lines == []
    else:
        assert lines[0] == f"upload {name} (staging): 0.0 MiB of {mib} (0%)"
        assert lines[-1] == f"upload {name} (uploaded): {mib} of {mib} (100%)"
        assert len(lines) <= 4 and "Downloading artifacts" not in r.output  # MLflow's own file-count bar is off
