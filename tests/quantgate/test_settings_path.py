"""One settings path for every runner: params.yaml `settings.mlflow_uri` reaches the registry and the audit trail
under `quantgate run` and under the DVC stage commands, not only under Celery."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from quantgate.cli import app
from registry.audit import AuditLog
from tests.validation._tiny import make_tiny_model

runner = CliRunner()


@pytest.fixture()
def project(tmp_path, monkeypatch):
    """A project folder whose params.yaml points MLflow somewhere only params.yaml names."""
    for var in ("QUANTGATE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "QUANTGATE_AUDIT_DB_URL", "QUANTGATE_STORE_DIR"):
        monkeypatch.delenv(var, raising=False)
    model = make_tiny_model(tmp_path / "tiny")
    store = tmp_path / "elsewhere"
    params = tmp_path / "params.yaml"
    params.write_text(f"settings:\n  mlflow_uri: sqlite:///{store / 'mlflow.db'}\n  workdir: {tmp_path / 'jobs'}\n",
                      encoding="utf-8")
    monkeypatch.setenv("QUANTGATE_PARAMS", str(params))
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    return {"model": model, "store": store, "params": params, "root": tmp_path}


def _registered_actions(store: Path) -> list[str]:
    with AuditLog(f"sqlite:///{store / 'audit.db'}") as log:
        return [e.action for e in log.events()]


def test_quantgate_run_registers_where_params_yaml_says(project):
    r = runner.invoke(app, ["run", "--params", str(project["params"]), "--model", str(project["model"]),
                            "--mix", "Q8_0", "--no-validate", "--register", "--json"])
    assert r.exit_code == 0, r.output
    assert (project["store"] / "mlflow.db").is_file()
    assert "register" in _registered_actions(project["store"])
    assert not (project["root"] / "mlruns-store").exists()  # the embedded default was not used


def test_dvc_stage_commands_register_where_params_yaml_says(project):
    out = project["root"] / "q"
    r = runner.invoke(app, ["stage", "quantize", "--model", str(project["model"]), "--mix", "Q8_0",
                            "--out-dir", str(out)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["stage", "register", "--artifact", str(out / "artifact.json"),
                            "--out", str(project["root"] / "registered.json")])
    assert r.exit_code == 0, r.output
    rec = json.loads((project["root"] / "registered.json").read_text())
    assert rec["version"] and (project["store"] / "mlflow.db").is_file()
    actions = _registered_actions(project["store"])
    assert "quantize" in actions and "register" in actions, (actions, rec)
    assert not (project["root"] / "mlruns-store").exists()
