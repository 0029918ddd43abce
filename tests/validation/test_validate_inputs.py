"""`quantgate validate` checks its inputs before run(): a non-regular --quantized (/dev/null, a FIFO) is refused with
one error line and exit 2, and nothing is written (no error record, report folder or audit event). A missing one is
left to validation, which writes its error record (tests/validation/test_gate.py)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantgate.cli import app
from validation.gate import UnusableInput, check_inputs

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "reference"


def _validate(quantized: str, tmp_path: Path, monkeypatch, *extra: str):
    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    monkeypatch.chdir(tmp_path)
    return CliRunner().invoke(app, ["validate", "--baseline", str(REFERENCE), "--quantized", quantized,
                                    "--threshold", "0.01", "--junit", str(tmp_path / "j.xml"), *extra])


def test_dev_null_quantized_refused_nothing_written(tmp_path, monkeypatch):
    r = _validate(os.devnull, tmp_path, monkeypatch)
    assert r.exit_code == 2, r.output
    assert "error:" in r.output and "character device" in r.output and "record:" not in r.output
    assert not Path(os.devnull + ".reports").exists()
    assert list(tmp_path.iterdir()) == []        # no junit, no audit DB, nothing under the working folder


def test_fifo_quantized_refused_nothing_written(tmp_path, monkeypatch):
    fifo = tmp_path / "q.gguf"
    os.mkfifo(fifo)
    r = _validate(str(fifo), tmp_path, monkeypatch, "--report-dir", str(tmp_path / "r"))
    assert r.exit_code == 2, r.output
    assert "a FIFO" in r.output and "record:" not in r.output
    assert [p.name for p in tmp_path.iterdir()] == ["q.gguf"]


def test_check_inputs_roles(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    check_inputs(REFERENCE, gguf)                 # a folder baseline and a regular candidate pass (content is later)
    with pytest.raises(UnusableInput, match="candidate is a folder"):
        check_inputs(REFERENCE, tmp_path)
    check_inputs(tmp_path / "nope", gguf)          # missing: left to validation's error record (JUnit error)
    check_inputs(REFERENCE, tmp_path / "nope.gguf")
    with pytest.raises(UnusableInput, match="baseline is a character device"):
        check_inputs(os.devnull, gguf)
