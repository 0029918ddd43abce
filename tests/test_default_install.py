"""The README's first command, as a user runs it: a venv made by `scripts/setup.sh` (what `scripts/quickstart.sh`
runs; no oracle, no llama-cpp-python), then `evaluate`, `validate` and `quantize --precision auto` on GGUFs made by
other tools (llama.cpp's pinned converter and `llama_model_quantize`), with relative paths, from another folder.

The GGUFs are made in the test venv (the oracle is needed to make them, not to use them); every quantgate command
runs in the fresh venv, whose interpreter must not be able to import llama_cpp."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.quant.test_fingerprint import llama_cpp_convert
from tests.quantgate.test_pipeline_llamacpp import _llama_quantize

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_venv(tmp_path_factory) -> Path:
    """A venv made by the README's setup path (scripts/setup.sh without --oracle)."""
    venv = tmp_path_factory.mktemp("default-install") / "venv"
    env = {**os.environ, "QUANTGATE_VENV": str(venv)}
    for k in ("PYTHONPATH", "VIRTUAL_ENV"):
        env.pop(k, None)
    run = subprocess.run(["bash", str(ROOT / "scripts" / "setup.sh")], env=env, capture_output=True, text=True,
                         timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    py = venv / "bin" / "python"
    probe = subprocess.run([str(py), "-c", "import llama_cpp"], capture_output=True, text=True, timeout=120)
    assert probe.returncode != 0 and "No module named 'llama_cpp'" in probe.stderr, "the default install has the oracle"
    return venv


def _user_env(venv: Path, work: Path) -> dict[str, str]:
    """The user's shell: the fresh venv's bin first, no test paths, no shared caches or stores."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUANTGATE_", "PYTHON", "VIRTUAL_ENV"))}
    env.update({"PATH": f"{venv / 'bin'}:/usr/bin:/bin", "HOME": str(work / "home"),
                "QUANTGATE_CACHE_DIR": str(work / "cache"), "QUANTGATE_STORE_DIR": str(work / "store"),
                "QUANTGATE_AUDIT_DB_URL": f"sqlite:///{work / 'audit.db'}", "MLFLOW_DISABLE_TELEMETRY": "true",
                "HF_HUB_OFFLINE": "1"})
    return env


def _qg(venv: Path, args: list[str], cwd: Path, work: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / "quantgate"), *args], cwd=cwd, env=_user_env(venv, work),
                          capture_output=True, text=True, timeout=1800)


def test_gguf_commands_work_on_the_default_install(require_oracle, default_venv, tmp_path):
    # Files the user brings: llama.cpp's F16 conversion of the reference model and llama-quantize's Q4_K_M of it.
    models = tmp_path / "models"
    models.mkdir()
    f16 = llama_cpp_convert(ROOT / "models" / "reference", models / "reference-f16.gguf", "f16")
    _llama_quantize(f16, models / "reference-q4km-llamacpp.gguf", 15)
    rows = [json.loads(x) for x in (ROOT / "data" / "eval.jsonl").read_text(encoding="utf-8").splitlines()]
    (models / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[::8]), encoding="utf-8")
    (models / "calib.jsonl").write_text("".join(json.dumps({"text": r["text"]}) + "\n" for r in rows[1::8]),
                                        encoding="utf-8")
    cwd = tmp_path / "elsewhere" / "job"  # the user's working folder: every path below is relative to it
    cwd.mkdir(parents=True)
    rel = Path("..") / ".." / "models"

    ev = _qg(default_venv, ["evaluate", "--baseline", str(rel / "reference-f16.gguf"), "--candidate",
                            str(rel / "reference-q4km-llamacpp.gguf"), "--dataset", str(rel / "eval.jsonl"),
                            "--max-tokens", "64", "--json", "eval.json"], cwd, tmp_path)
    assert ev.returncode == 0, ev.stdout + ev.stderr
    report = json.loads((cwd / "eval.json").read_text(encoding="utf-8"))
    overall = report["overall"] if "overall" in report else report
    assert 0 < overall["kl_mean"] < 0.5, overall

    val = _qg(default_venv, ["validate", "--baseline", str(rel / "reference-f16.gguf"), "--quantized",
                             str(rel / "reference-q4km-llamacpp.gguf"), "--dataset", str(rel / "eval.jsonl"),
                             "--max-tokens", "64", "--metric", "kl_mean", "--threshold", "0.5", "--no-expectations",
                             "--report-dir", "reports"], cwd, tmp_path)
    assert val.returncode == 0, val.stdout + val.stderr
    assert "PASSED" in val.stdout and (cwd / "reports").is_dir()

    auto = _qg(default_venv, ["quantize", "--model", str(rel / "reference-f16.gguf"), "--precision", "auto",
                              "--target-bpw", "5", "--calib", str(rel / "calib.jsonl"), "--out", "auto.gguf", "-q"],
               cwd, tmp_path)
    assert auto.returncode == 0, auto.stdout + auto.stderr
    assert "llama-cpp-python" not in auto.stderr
    ver = _qg(default_venv, ["verify", "auto.gguf"], cwd, tmp_path)
    assert ver.returncode == 0, ver.stdout + ver.stderr
    gate = _qg(default_venv, ["validate", "--baseline", str(rel / "reference-f16.gguf"), "--quantized", "auto.gguf",
                              "--dataset", str(rel / "eval.jsonl"), "--max-tokens", "64", "--metric", "kl_mean",
                              "--threshold", "0.5", "--no-expectations", "--report-dir", "reports-auto"],
               cwd, tmp_path)
    assert gate.returncode == 0, gate.stdout + gate.stderr
