"""The DVC pipeline (dvc.yaml + params.yaml) on a tiny model in a temporary git repository: a real `dvc repro`,
then a gate-threshold change re-runs only validate + register, and a new mix runs only that mix's stages; the AUTO
mix (quantize_auto) is fed by the profile stage."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.skipif(shutil.which("git") is None, reason="dvc metrics/params diff need git"),
              pytest.mark.slow]  # ~2 min on 2 busy cores: 21 stage runs, each a fresh `quantgate` process


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def _commit(repo: Path, env: dict[str, str], msg: str) -> None:
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", msg], repo, env)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from tests.validation._tiny import make_tiny_model, write_samples

    repo = tmp_path_factory.mktemp("dvcrepo")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    make_tiny_model(repo / "models" / "tiny")
    (repo / "data").mkdir()
    write_samples(repo / "data" / "eval.jsonl")
    write_samples(repo / "data" / "calib.jsonl", seed=7, n=3)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"path": "models/tiny", "name": "tiny"}
    params["mixes"] = ["Q8_0", "Q4_K_M"]
    params["eval"] = {"dataset": "data/eval.jsonl", "max_tokens": 32, "expectations": False}
    params["profile"] = {"calib": "data/calib.jsonl", "chunk_size": 64, "measure_seqs": 2, "measure_len": 32}
    params["gates"] = ["ppl_ratio <= 1.5", "kl_mean <= 0.5"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "QUANTGATE_CACHE_DIR": str(repo / ".qgcache"),
           "QUANTGATE_STORE_DIR": str(repo / "mlruns-store"), "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t",
           "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t", "MLFLOW_DISABLE_TELEMETRY": "true",
           "GX_ANALYTICS_ENABLED": "false"}
    (repo / ".gitignore").write_text("/out/\n/mlruns-store/\n/.qgcache/\n")
    _run(["git", "init", "-q"], repo, env)
    _commit(repo, env, "pipeline")
    return repo, env


def test_repro_then_threshold_change_then_new_mix(repo):
    repo, env = repo
    dvc = [str(Path(sys.executable).parent / "dvc")]
    out = _run(dvc + ["repro"], repo, env)
    every = {"prepare", "profile", "plots", "quantize_auto", "validate_auto", "register_auto"} | {
        f"{s}@{m}" for s in ("quantize", "validate", "register") for m in ("Q8_0", "Q4_K_M")}
    assert _ran(out) == every
    # the profile stage feeds the AUTO mix: --precision auto under params auto.target (Q4_K_M's size)
    auto = json.loads((repo / "out/pipeline/quantize/AUTO/artifact.json").read_text())
    q4 = json.loads((repo / "out/pipeline/quantize/Q4_K_M/artifact.json").read_text())
    assert auto["recipe"]["precision"] == "AUTO" and auto["auto"]["profile"] == "out/pipeline/profile.json"
    assert sum(auto["tensor_bytes"].values()) <= sum(q4["tensor_bytes"].values())
    assert (repo / "out/pipeline/register/AUTO.json").is_file()
    assert _ran(_run(dvc + ["repro"], repo, env)) == set()   # nothing changed: nothing runs
    m = json.loads(_run(dvc + ["metrics", "show", "--json"], repo, env))
    flat = json.dumps(m)
    for key in ("size_bytes", "bpw", "ppl_ratio", "kl_mean", "weight_rel_rmse_mean"):
        assert key in flat
    assert (repo / "out/pipeline/plots/tensor_error_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert (repo / "out/pipeline/plots/bpw_vs_kld.png").read_bytes()[:4] == b"\x89PNG"
    reg = json.loads((repo / "out/pipeline/register/Q8_0.json").read_text())
    assert reg["model_name"] == "tiny" and reg["verdict"] in ("passed", "failed")
    _commit(repo, env, "first run")

    # a gate threshold changes: only validate and register re-run
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gates"] = ["ppl_ratio <= 1.0000001", "kl_mean <= 0.5"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(dvc + ["repro"], repo, env)
    assert _ran(out) == {f"{s}@{m}" for s in ("validate", "register") for m in ("Q8_0", "Q4_K_M")} | {
        "validate_auto", "register_auto"}
    verdict = json.loads((repo / "out/pipeline/validate/Q4_K_M/verdict.json").read_text())
    assert verdict["passed"] is False
    assert "gates" in _run(dvc + ["params", "diff"], repo, env)
    _commit(repo, env, "stricter gate")

    # a mix is added: only that mix's stages (and the plots over all mixes) run
    params["mixes"].append("Q2_K")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(dvc + ["repro"], repo, env)
    assert _ran(out) == {"quantize@Q2_K", "validate@Q2_K", "register@Q2_K", "plots"}
    diff = _run(dvc + ["metrics", "diff", "--json"], repo, env)
    assert "Q2_K" in diff
