"""`quantgate run --model X`: the outputs and the registered model are named after X, not after params.yaml's
model (whose `name` describes params' own model)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]


def test_run_model_names_outputs_and_registered_model_after_it(tmp_path, monkeypatch):
    from quantgate.cli import app

    monkeypatch.chdir(tmp_path)
    for var in ("QUANTGATE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "QUANTGATE_AUDIT_DB_URL",
                "QUANTGATE_MODEL_NAME", "QUANTGATE_WORKDIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("QUANTGATE_STORE_DIR", str(tmp_path / "mlruns-store"))
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "params.yaml").write_text("model:\n  path: models/reference\n  name: reference\nmixes: [Q4_K_M]\n")
    shutil.copytree(REPO / "models" / "reference", tmp_path / "my-llama", ignore=shutil.ignore_patterns("*.png"))
    r = CliRunner().invoke(app, ["run", "--model", "my-llama", "--mix", "Q8_0", "--no-validate", "--register",
                                 "--workdir", "jobs", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    (one,) = res["results"]
    assert Path(one["artifact"]["path"]).name == "my-llama-Q8_0.gguf"
    assert one["version"]["model_name"] == f"my-llama-{res['source_sha256'][:8]}"  # not params' "reference"
    r = CliRunner().invoke(app, ["run", "--model", "my-llama", "--model-name", "chosen", "--mix", "Q8_0",
                                 "--no-validate", "--register", "--workdir", "jobs", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["results"][0]["version"]["model_name"] == "chosen"
