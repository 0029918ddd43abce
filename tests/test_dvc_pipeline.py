"""The DVC pipeline (dvc.yaml + params.yaml) on a tiny model in a temporary git repository: a real `dvc repro`,
then a gate-threshold change re-runs only validate + register (and prepare, which always runs), and a new mix runs
only that mix's stages; the AUTO mix (quantize_auto) is fed by the profile stage. What DVC tracks is reproducible (a forced re-run leaves dvc.lock as
it was), `dvc metrics show` has one row per mix, and `dvc metrics diff` / `dvc plots diff` compare two commits and
a commit with a `dvc exp run -S ...` experiment."""
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


def _json(cmd: list[str], cwd: Path, env: dict[str, str]) -> dict:
    """A dvc command's --json output (stdout only: DVC warns on stderr)."""
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)


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
    # nothing changed: only prepare runs (always_changed: it re-resolves the model) and nothing after it
    assert _ran(_run(dvc + ["repro"], repo, env)) == {"prepare"}
    m = _json(dvc + ["metrics", "show", "--json"], repo, env)
    rows = _metric_rows(m[""])                                  # one file (one row) per mix, both stages' figures
    assert set(rows) == {"Q8_0", "Q4_K_M", "AUTO"}
    for row in rows.values():
        assert {"size_bytes", "bpw", "weight_rel_rmse_mean", "ppl_ratio", "kl_mean", "acc_candidate"} <= set(row)
    assert rows["Q8_0"]["bpw"] > rows["Q4_K_M"]["bpw"] and rows["Q8_0"]["kl_mean"] < rows["Q4_K_M"]["kl_mean"]
    assert (repo / "out/pipeline/plots/tensor_error_by_layer.png").read_bytes()[:4] == b"\x89PNG"
    assert (repo / "out/pipeline/plots/bpw_vs_kld.png").read_bytes()[:4] == b"\x89PNG"
    reg = json.loads((repo / "out/pipeline/register/Q8_0.json").read_text())
    assert reg["model_name"] == "tiny" and reg["verdict"] in ("passed", "failed") and "run_id" not in reg
    # the run records are there, beside what DVC tracks: the verdict with its timestamp, the reports
    record = json.loads((repo / "out/pipeline/validate/Q8_0/verdict.json").read_text())
    assert record["created_at"] and (repo / "out/pipeline/validate/Q8_0/reports").is_dir()
    assert json.loads((repo / "out/pipeline/verdicts/Q8_0.json").read_text())["passed"] == record["passed"]
    _commit(repo, env, "first run")

    # what DVC tracks is content: forced re-runs (a second registration finds its version) leave dvc.lock as is
    out = _run(dvc + ["repro", "--force", "-s", "quantize@Q8_0", "validate@Q8_0", "register@Q8_0"], repo, env)
    assert _ran(out) == {"quantize@Q8_0", "validate@Q8_0", "register@Q8_0"}
    assert _run(["git", "status", "--porcelain"], repo, env) == ""

    # a gate threshold changes: only validate and register re-run
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["gates"] = ["ppl_ratio <= 1.0000001", "kl_mean <= 0.5"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(dvc + ["repro"], repo, env)
    assert _ran(out) == {f"{s}@{m}" for s in ("validate", "register") for m in ("Q8_0", "Q4_K_M")} | {
        "validate_auto", "register_auto", "prepare"}
    verdict = json.loads((repo / "out/pipeline/validate/Q4_K_M/verdict.json").read_text())
    assert verdict["passed"] is False
    assert "gates" in _run(dvc + ["params", "diff"], repo, env)
    _commit(repo, env, "stricter gate")

    # a mix is added: only that mix's stages (and the plots over all mixes) run
    params["mixes"].append("Q2_K")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(dvc + ["repro"], repo, env)
    assert _ran(out) == {"prepare", "quantize@Q2_K", "validate@Q2_K", "register@Q2_K", "plots"}
    _commit(repo, env, "Q2_K")

    # two commits: the new mix's metrics file appears; both plots carry both revisions' data
    diff = _json(dvc + ["metrics", "diff", "HEAD~1", "HEAD", "--json"], repo, env)
    q2 = diff["out/pipeline/metrics/Q2_K.json"]
    assert q2["kl_mean"]["old"] is None and q2["kl_mean"]["new"] > rows["Q4_K_M"]["kl_mean"]
    assert _plot_revs(_json(dvc + ["plots", "diff", "HEAD~1", "HEAD", "--json"], repo, env)) == {
        "bpw_vs_kld": {"HEAD~1": {"Q8_0", "Q4_K_M", "AUTO"}, "HEAD": {"Q8_0", "Q4_K_M", "AUTO", "Q2_K"}},
        "layer_error": {"HEAD~1": {"Q8_0", "Q4_K_M", "AUTO"}, "HEAD": {"Q8_0", "Q4_K_M", "AUTO", "Q2_K"}}}

    # an experiment with another AUTO budget: only the AUTO branch (and the plots) re-run; diff against it
    out = _run(dvc + ["exp", "run", "-n", "auto-q2k", "-S", "auto.target=Q2_K"], repo, env)
    assert _ran(out) == {"prepare", "quantize_auto", "validate_auto", "register_auto", "plots"}
    diff = _json(dvc + ["metrics", "diff", "HEAD", "auto-q2k", "--json"], repo, env)
    assert set(diff) == {"out/pipeline/metrics/AUTO.json"}
    assert diff["out/pipeline/metrics/AUTO.json"]["bpw"]["new"] < diff["out/pipeline/metrics/AUTO.json"]["bpw"]["old"]
    revs = _plot_revs(_json(dvc + ["plots", "diff", "HEAD", "auto-q2k", "--json"], repo, env))
    assert set(revs["bpw_vs_kld"]) == {"HEAD", "auto-q2k"}


def _metric_rows(show: dict) -> dict[str, dict]:
    """`dvc metrics show --json` of one revision -> {mix: its metrics}."""
    return {Path(f).stem: d["data"] for f, d in show["data"].items()}


def _plot_revs(doc: dict) -> dict[str, dict[str, set[str]]]:
    """`dvc plots diff --json` -> {plot id: {revision: the mixes in its data}}."""
    out: dict[str, dict[str, set[str]]] = {}
    for plot_id, renders in doc["data"].items():
        for r in renders:
            assert r["type"] == "vega", r
            for point in r["content"]["data"]["values"]:
                out.setdefault(plot_id, {}).setdefault(point["rev"], set()).add(point["mix"])
    return out
