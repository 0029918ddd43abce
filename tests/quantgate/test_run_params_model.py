"""`quantgate run` without `--model`: params.yaml's model.path (with model.repo / model.rev) is a model reference
exactly like `--model` — a models:/NAME@ALIAS in a real MLflow store, a Hub id in a real HF cache folder at a
revision, a path in a real DVC repository at a tag, a local path relative to the current directory (as the DVC
prepare stage reads it) — and the GGUF and the registered version carry the same lineage."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tests._mlflow_models import REFERENCE, log_version
from tests.quantgate.test_inputs import COMMIT, _hf_cache, dvc_model_repo


@pytest.fixture
def cli(tmp_path, monkeypatch):
    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "qg-cache"))
    monkeypatch.setenv("QUANTGATE_STORE_DIR", str(tmp_path / "mlruns-store"))
    for var in ("QUANTGATE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "QUANTGATE_AUDIT_DB_URL",
                "QUANTGATE_MODEL_NAME", "QUANTGATE_WORKDIR", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def _params(path: Path, model: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"model": model, "mixes": ["Q8_0"]}))   # JSON is YAML
    return path


def _kv(path: str) -> dict:
    from quant.gguf_reader import read_gguf

    with read_gguf(path) as g:
        return {k.key: k.value for k in g.kv if k.key.startswith("quantgate.")}


def _run(cli, params: Path, *extra) -> dict:
    r = cli("run", "--params", params, "--no-validate", "--workdir", "jobs", "--json", *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_params_registry_alias_is_resolved_and_named_like_model_flag(cli, tmp_path):
    from mlflow import MlflowClient

    store = tmp_path / "mlruns-store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    v1 = log_version(uri, store, "base", REFERENCE)
    MlflowClient(uri, uri).set_registered_model_alias("base", "champion", v1)
    params = _params(tmp_path / "params.yaml", {"path": "models:/base@champion", "name": "base-q"})

    res = _run(cli, params, "--register")
    (one,) = res["results"]
    kv = _kv(one["artifact"]["path"])
    assert kv["quantgate.source_ref"] == f"models:/base/{v1}"
    lin = json.loads(kv["quantgate.source_lineage"])
    assert lin["kind"] == "mlflow" and lin["alias"] == "champion" and lin["version"] == v1
    assert Path(one["artifact"]["path"]).name == "base-Q8_0.gguf"      # the source's name, not the download folder
    assert one["version"]["model_name"] == "base-q"                      # params model.name: the registered name
    mv = MlflowClient(uri, uri).get_model_version("base-q", one["version"]["version"])
    assert mv.tags["source"] == f"models:/base/{v1}"
    # the same reference through --model gives the same lineage (and the finished artifact is reused)
    again = _run(cli, params, "--model", "models:/base@champion")
    assert _kv(again["results"][0]["artifact"]["path"])["quantgate.source_lineage"] == kv["quantgate.source_lineage"]

    # a reference the registry does not hold: one error line, exit 2, nothing written
    bad = cli("run", "--params", _params(tmp_path / "bad.yaml", {"path": "models:/base/99"}), "--no-validate",
              "--workdir", "jobs2")
    assert bad.exit_code == 2 and bad.output.count("error:") == 1 and "no version 99" in bad.output
    assert "Traceback" not in bad.output and not (tmp_path / "jobs2").exists()


def test_params_hub_id_and_relative_path(cli, tmp_path, monkeypatch):
    hub = tmp_path / "hf-home" / "hub"
    _hf_cache(hub, "acme/reference", REFERENCE)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    params = _params(tmp_path / "conf" / "params.yaml", {"path": "acme/reference", "rev": COMMIT})
    (one,) = _run(cli, params)["results"]
    kv = _kv(one["artifact"]["path"])
    assert kv["quantgate.source_ref"] == f"acme/reference@{COMMIT}"
    assert json.loads(kv["quantgate.source_lineage"])["revision"] == COMMIT
    assert Path(one["artifact"]["path"]).name == "reference-Q8_0.gguf"
    # --model-rev on the command line wins over params model.rev (as in `stage prepare`)
    r = cli("run", "--params", params, "--model-rev", "v9", "--no-validate", "--workdir", "jobs")
    assert r.exit_code == 2 and r.output.count("error:") == 1 and "not in the Hugging Face cache" in r.output

    # a plain path: relative to the current directory (where `dvc repro` runs the prepare stage), no lineage,
    # outputs and the registered name after params model.name as before
    shutil.copytree(REFERENCE, tmp_path / "here" / "my-llama", ignore=shutil.ignore_patterns("*.png"))
    monkeypatch.chdir(tmp_path / "here")
    params = _params(tmp_path / "conf" / "local.yaml", {"path": "my-llama", "name": "mine"})
    (one,) = _run(cli, params)["results"]
    assert Path(one["artifact"]["path"]).name == "mine-Q8_0.gguf"
    assert "quantgate.source_ref" not in _kv(one["artifact"]["path"])

    # hostile params: one error line, exit 2
    for model, text in (({"path": "acme/reference", "rev": "../../etc"}, "not a git or Hub revision"),
                        ({"path": ["a", "b"]}, "model.path must be text"),
                        ("models/reference", "model must be a mapping"),
                        ({"name": "x"}, "no model: pass --model or set model.path")):
        r = cli("run", "--params", _params(tmp_path / "conf" / "bad.yaml", model), "--no-validate")
        assert r.exit_code == 2 and r.output.count("error:") == 1 and text in r.output, (model, r.output)
        assert "Traceback" not in r.output


def test_params_dvc_repo_at_a_revision(cli, tmp_path):
    repo, v1 = dvc_model_repo(tmp_path)
    params = _params(tmp_path / "params.yaml", {"path": "models/base", "repo": str(repo), "rev": "v1",
                                                "name": "base-q"})
    (one,) = _run(cli, params)["results"]
    kv = _kv(one["artifact"]["path"])
    assert kv["quantgate.source_ref"] == f"{repo}@{v1}:models/base"
    lin = json.loads(kv["quantgate.source_lineage"])
    assert lin["kind"] == "dvc" and lin["rev"] == "v1" and lin["commit"] == v1
    # the prepare stage reads the same params the same way: the same lineage
    r = cli("stage", "prepare", "--params", params, "-o", tmp_path / "source.json")
    assert r.exit_code == 0, r.output
    src = json.loads((tmp_path / "source.json").read_text())
    assert src["resolved"] == kv["quantgate.source_ref"] and src["lineage"]["commit"] == v1
