"""`quantize --dry-run` prints the plan a real run writes (same types, bytes, bpw; nothing written), and `--quiet`
keeps library noise (gguf's tokenizer warning, transformers' bars, MLflow lines) off stderr but never our error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REFERENCE = REPO / "models" / "reference"


def _cli(*args, cwd: Path, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("extra", [("-p", "Q4_K_M"), ("-p", "Q3_K_S", "--output-tensor-type", "Q8_0",
                                                      "--tensor-type", "ffn_down=Q5_K")])
def test_dry_run_is_the_plan_a_real_run_writes(tmp_path, monkeypatch, extra):
    from gguf import GGUFReader
    from typer.testing import CliRunner

    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("QUANTGATE_AUDIT_DB_URL", raising=False)
    run = lambda *a: CliRunner().invoke(app, ["quantize", "-m", str(REFERENCE), *extra, "-o", str(out), *a])  # noqa
    out = tmp_path / "out" / "ref.gguf"
    out.parent.mkdir()
    dry = run("--dry-run", "--json")
    assert dry.exit_code == 0, dry.output
    plan = json.loads(dry.stdout)
    assert not any(out.parent.iterdir()) and not (tmp_path / "store").exists()  # nothing written, nothing audited
    table = run("--dry-run")
    assert table.exit_code == 0 and f"{plan['bits_per_weight']:.4f} bpw; dry run, nothing written" in table.stdout
    assert plan["tensors"][0]["name"] in table.stdout and not any(out.parent.iterdir())

    real = run("--json")
    assert real.exit_code == 0, real.output
    art = json.loads(real.stdout)
    written = [(t.name, t.tensor_type.name, int(t.n_bytes)) for t in GGUFReader(str(out)).tensors]
    assert [(t["name"], t["type"], t["bytes"]) for t in plan["tensors"]] == written  # same order, types, bytes
    assert plan["tensor_bytes"] == sum(b for _, _, b in written) == sum(art["tensor_bytes"].values())
    assert plan["bits_per_weight"] == pytest.approx(art["bits_per_weight"], rel=0, abs=1e-12)
    assert plan["n_params"] == art["n_params"] and plan["file_type"] == art["file_type"]
    assert plan["precision"] == art["recipe"]["precision"]


def test_quiet_silences_library_noise_but_not_our_error(tmp_path):
    env = {"QUANTGATE_STORE_DIR": str(tmp_path / "store"), "QUANTGATE_CACHE_DIR": str(tmp_path / "cache")}
    loud = _cli("quantize", "-m", REFERENCE, "-p", "Q8_0", "-o", tmp_path / "a.gguf", cwd=tmp_path, env_extra=env)
    assert loud.returncode == 0 and "Unknown separator token" in loud.stderr  # gguf's warning, without --quiet
    quiet = _cli("quantize", "-m", REFERENCE, "-p", "Q8_0", "-o", tmp_path / "b.gguf", "--quiet", cwd=tmp_path,
                 env_extra=env)
    assert quiet.returncode == 0 and quiet.stderr == "" and quiet.stdout == ""
    rows = (REPO / "data" / "eval.jsonl").read_text().splitlines()[:2]
    (tmp_path / "eval.jsonl").write_text("\n".join(rows) + "\n")
    ev = _cli("evaluate", "-b", REFERENCE, "-c", tmp_path / "b.gguf", "-d", tmp_path / "eval.jsonl", "--max-tokens",
              "24", "--json", tmp_path / "ev.json", "--quiet", cwd=tmp_path, env_extra=env)
    assert ev.returncode == 0 and ev.stderr == "", ev.stderr  # no "Loading weights" bar, no tokenizer warnings
    assert json.loads((tmp_path / "ev.json").read_text())["overall"]["kl_mean"] >= 0
    bad = _cli("quantize", "-m", REFERENCE, "-p", "Q9_9", "-o", tmp_path / "c.gguf", "--quiet", cwd=tmp_path,
               env_extra=env)
    lines = [ln for ln in bad.stderr.splitlines() if ln.strip()]
    assert bad.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:"), bad.stderr
