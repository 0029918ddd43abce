"""The DVC stages on a model reference (quantgate.source_record): params `model.path: models:/base@champion` in a real
MLflow SQLite store, a real `dvc repro` in a temporary git repository. prepare resolves the alias and pins the
version in source.json; quantize/validate/register open that version (SHA-256 checked) and the GGUF, the registry and
the compliance report name it; a repro with nothing moved runs only prepare; moving the alias re-runs the branch.
Hostile or stale source.json files are refused with one error line (exit 2)."""
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
from typer.testing import CliRunner

from tests._mlflow_models import REFERENCE, log_version, retrained

ROOT = Path(__file__).resolve().parents[2]
BRANCH = {"prepare", "quantize@Q8_0", "validate@Q8_0", "register@Q8_0"}


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


def _ran(out: str) -> set[str]:
    return set(re.findall(r"Running stage '([^']+)'", out))


def _kv(path: Path) -> dict:
    from quant.gguf_reader import read_gguf

    with read_gguf(path) as g:
        return {k.key: k.value for k in g.kv if k.key.startswith("quantgate.")}


@pytest.mark.slow  # ~1 min: three small repros (each stage a fresh `quantgate` process) on the bundled model
def test_dvc_stages_on_a_registry_alias(tmp_path):
    from mlflow import MlflowClient

    from core.hashing import checkpoint_sha256

    repo = tmp_path / "pipeline"
    repo.mkdir()
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(ROOT / name, repo / name)
    shutil.copytree(ROOT / ".dvc", repo / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local"))
    (repo / "data").mkdir()
    shutil.copy(ROOT / "data" / "eval.jsonl", repo / "data" / "eval.jsonl")
    store = repo / "mlruns-store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    v1 = log_version(uri, store, "base", REFERENCE)
    client = MlflowClient(uri, uri)
    client.set_registered_model_alias("base", "champion", v1)

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["model"] = {"path": "models:/base@champion", "name": "base-q"}
    params["mixes"] = ["Q8_0"]
    params["eval"] = {"dataset": "data/eval.jsonl", "max_tokens": 32, "expectations": False}
    params["gates"] = ["ppl_ratio <= 1.5", "kl_mean <= 0.5"]
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (repo / ".gitignore").write_text("/out/\n/mlruns-store/\n/.qgcache/\n")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "DVC_NO_ANALYTICS": "1", "QUANTGATE_CACHE_DIR": str(repo / ".qgcache"), "QUANTGATE_STORE_DIR": str(store),
           "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t",
           "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false"}
    for var in ("QUANTGATE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "QUANTGATE_AUDIT_DB_URL",
                "QUANTGATE_MLFLOW_ARTIFACTS"):
        env.pop(var, None)
    _run(["git", "init", "-q"], repo, env)
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "pipeline on models:/base@champion"], repo, env)
    dvc = [str(Path(sys.executable).parent / "dvc")]

    # prepare resolves the alias and pins the version; the stages after it read exactly that version
    assert _ran(_run(dvc + ["repro", "register@Q8_0"], repo, env)) == BRANCH
    src = json.loads((repo / "out/pipeline/source.json").read_text())
    assert src["kind"] == "mlflow" and src["ref"] == "models:/base@champion"
    assert src["resolved"] == src["pin"]["value"] == f"models:/base/{v1}"
    assert src["lineage"]["alias"] == "champion" and src["lineage"]["version"] == v1
    assert src["sha256"] == checkpoint_sha256([REFERENCE / "model.safetensors"])
    assert ".qgcache" not in json.dumps(src)        # no machine path of the download: dvc.lock is portable
    art = json.loads((repo / "out/pipeline/quantize/Q8_0/artifact.json").read_text())
    assert art["source"] == f"models:/base/{v1}"
    kv = _kv(repo / "out/pipeline/quantize/Q8_0/model-Q8_0.gguf")
    assert kv["quantgate.source_ref"] == f"models:/base/{v1}"
    assert json.loads(kv["quantgate.source_lineage"])["alias"] == "champion"
    reg = json.loads((repo / "out/pipeline/register/Q8_0.json").read_text())
    assert reg["model_name"] == "base-q" and reg["verdict"] == "passed"
    mv = client.get_model_version("base-q", reg["version"])
    assert mv.tags["source"] == f"models:/base/{v1}"
    assert client.get_run(mv.run_id).data.params["source.version"] == v1
    rep = subprocess.run([sys.executable, "-m", "quantgate.cli", "report", "base-q", reg["version"], "--out",
                          str(tmp_path / "rep"), "--format", "md"], cwd=repo, env=env, capture_output=True, text=True)
    assert rep.returncode == 0, rep.stderr
    md = next((tmp_path / "rep").glob("*.md")).read_text()
    assert re.search(rf"models:/base/{v1}\b", md.replace("\\", "")), md[:2000]
    _run(["git", "add", "-A"], repo, env)
    _run(["git", "commit", "-qm", "first run"], repo, env)

    # nothing moved: prepare re-resolves (always_changed), writes the same source.json, nothing else runs
    assert _ran(_run(dvc + ["repro", "register@Q8_0"], repo, env)) == {"prepare"}
    assert _run(["git", "status", "--porcelain"], repo, env) == ""

    # the alias moves to a retrained version: DVC learns it through source.json and re-runs the branch
    v2 = log_version(uri, store, "base", retrained(tmp_path / "retrained"))
    client.set_registered_model_alias("base", "champion", v2)
    assert _ran(_run(dvc + ["repro", "register@Q8_0"], repo, env)) == BRANCH
    src2 = json.loads((repo / "out/pipeline/source.json").read_text())
    assert src2["resolved"] == f"models:/base/{v2}" and src2["sha256"] != src["sha256"]
    assert _kv(repo / "out/pipeline/quantize/Q8_0/model-Q8_0.gguf")["quantgate.source_ref"] == f"models:/base/{v2}"
    assert "dvc.lock" in _run(["git", "status", "--porcelain"], repo, env)


@pytest.fixture
def cli(tmp_path, monkeypatch):
    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "qg-cache"))
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _one_error(r, text: str) -> None:
    assert r.exit_code == 2, r.output
    assert r.output.count("error:") == 1 and text in r.output and "Traceback" not in r.output, r.output


def test_stale_or_hostile_source_record_is_refused(cli, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(REFERENCE, model, ignore=shutil.ignore_patterns("*.png"))
    r = cli("stage", "prepare", "--model", model, "--out", tmp_path / "source.json")
    assert r.exit_code == 0, r.output
    good = json.loads((tmp_path / "source.json").read_text())
    assert good["kind"] == "path" and good["pin"] == {"value": str(model), "repo": None, "rev": None}
    assert good["fingerprint"] and len(good["sha256"]) == 64 and good["lineage"] == {}

    # the folder changed after prepare: the later stages refuse it before writing anything
    retrained(tmp_path / "other")
    shutil.copy(tmp_path / "other" / "model.safetensors", model / "model.safetensors")
    r = cli("stage", "quantize", "--source", tmp_path / "source.json", "--mix", "Q8_0", "--out-dir", tmp_path / "q")
    _one_error(r, "changed since it was resolved")
    assert not (tmp_path / "q").exists() or not list((tmp_path / "q").glob("*.gguf"))

    hostile = {
        "expected a JSON object": [],
        "schema_version": {**good, "schema_version": 99},
        "sha256 is not": {**good, "sha256": "../../etc"},
        "unknown kind": {**good, "kind": "s3"},
        "not a git or Hub revision": {**good, "pin": {"value": "acme/model", "repo": None, "rev": "--upload-pack=x"}},
        "control characters": {**good, "pin": {"value": "acme/\x1b[31mmodel", "repo": None, "rev": None}},
    }
    for text, doc in hostile.items():
        (tmp_path / "bad.json").write_text(json.dumps(doc))
        _one_error(cli("stage", "validate", "--artifact", tmp_path / "none.json", "--source", tmp_path / "bad.json",
                       "--out", tmp_path / "v.json"), text)
    (tmp_path / "big.json").write_bytes(b" " * (2 << 20))
    _one_error(cli("stage", "quantize", "--source", tmp_path / "big.json", "--mix", "Q8_0", "--out-dir",
                   tmp_path / "q"), "more than the")
    _one_error(cli("stage", "quantize", "--source", tmp_path / "source.json", "--model", model, "--mix", "Q8_0",
                   "--out-dir", tmp_path / "q"), "exactly one of --model and --source")
    _one_error(cli("stage", "prepare", "--params", tmp_path / "none.yaml", "--out", tmp_path / "s.json"),
               "no model")
