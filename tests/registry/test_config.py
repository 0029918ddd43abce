"""Registry settings: embedded defaults in the working directory, QUANTGATE_* and MLflow's own variables."""
from __future__ import annotations

import os
from pathlib import Path

from registry.config import RegistrySettings, default_audit_url


def test_defaults_embed_everything_in_the_working_directory(tmp_path):
    s = RegistrySettings.from_env(env={}, cwd=tmp_path)
    store = (tmp_path / "mlruns-store").resolve()
    assert s.tracking_uri == f"sqlite:///{store / 'mlflow.db'}" == s.registry_uri
    assert s.artifact_location == (store / "artifacts").as_uri()
    assert s.audit_db_url == f"sqlite:///{store / 'audit.db'}"
    assert s.experiment == "quantgate" and s.model_name is None
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"


def test_quantgate_uri_wins_over_mlflow_tracking_uri(tmp_path):
    env = {"QUANTGATE_MLFLOW_URI": "http://127.0.0.1:5000", "MLFLOW_TRACKING_URI": "http://other:1",
           "MLFLOW_REGISTRY_URI": "sqlite:////r/reg.db", "QUANTGATE_STORE_DIR": str(tmp_path)}
    s = RegistrySettings.from_env(env=env)
    assert s.tracking_uri == "http://127.0.0.1:5000" and s.registry_uri == "sqlite:////r/reg.db"
    assert s.artifact_location is None  # the server decides where artifacts go
    assert s.audit_db_url == f"sqlite:///{Path(tmp_path).resolve() / 'audit.db'}"


def test_mlflow_tracking_uri_is_honoured_and_audit_follows_postgres():
    pg = "postgresql://u@db:5432/mlflow"
    s = RegistrySettings.from_env(env={"MLFLOW_TRACKING_URI": pg})
    assert s.tracking_uri == pg and s.audit_db_url == pg
    assert default_audit_url("postgres://u@db/m", Path("/x")) == "postgresql://u@db/m"
    s2 = RegistrySettings.from_env(env={"MLFLOW_TRACKING_URI": pg, "QUANTGATE_AUDIT_DB_URL": "sqlite:////a.db",
                                       "QUANTGATE_MODEL_NAME": "mine", "QUANTGATE_EXPERIMENT": "exp"})
    assert (s2.audit_db_url, s2.model_name, s2.experiment) == ("sqlite:////a.db", "mine", "exp")
