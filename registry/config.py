"""Registry settings: where MLflow tracks and registers, where artifacts and the audit trail live.

Defaults embed everything in the working directory (./mlruns-store/mlflow.db, ./mlruns-store/artifacts,
./mlruns-store/audit.db). Environment, highest first: QUANTGATE_MLFLOW_URI, then MLflow's own
MLFLOW_TRACKING_URI; MLFLOW_REGISTRY_URI (else the tracking URI); QUANTGATE_MLFLOW_ARTIFACTS;
QUANTGATE_AUDIT_DB_URL; QUANTGATE_STORE_DIR; QUANTGATE_EXPERIMENT; QUANTGATE_MODEL_NAME.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping

# MLflow 3.x sends client telemetry unless told not to: set before any `import mlflow`.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

DEFAULT_STORE_DIR = "mlruns-store"
DEFAULT_EXPERIMENT = "quantgate"


@dataclass(frozen=True)
class RegistrySettings:
    """Resolved registry configuration (see the module docstring for the environment variables)."""

    tracking_uri: str
    registry_uri: str
    artifact_location: str | None
    audit_db_url: str
    experiment: str = DEFAULT_EXPERIMENT
    model_name: str | None = None
    store_dir: Path | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, cwd: Path | None = None) -> "RegistrySettings":
        """Settings from the environment (or `env`), defaulting to an embedded store under `cwd`."""
        e = os.environ if env is None else env
        tracking = e.get("QUANTGATE_MLFLOW_URI") or e.get("MLFLOW_TRACKING_URI")
        if e.get("QUANTGATE_STORE_DIR"):
            store = Path(e["QUANTGATE_STORE_DIR"]).resolve()
        elif tracking and tracking.startswith("sqlite:///"):  # a SQLite store keeps its artifacts beside it
            store = Path(tracking[len("sqlite:///"):]).resolve().parent
        else:
            store = (Path(cwd or Path.cwd()) / DEFAULT_STORE_DIR).resolve()
        tracking = tracking or f"sqlite:///{store / 'mlflow.db'}"
        registry = e.get("MLFLOW_REGISTRY_URI") or tracking
        artifacts = e.get("QUANTGATE_MLFLOW_ARTIFACTS")
        if not artifacts and _is_local_db(tracking):
            artifacts = (store / "artifacts").as_uri()
        audit = e.get("QUANTGATE_AUDIT_DB_URL") or default_audit_url(tracking, store)
        return cls(
            tracking_uri=tracking,
            registry_uri=registry,
            artifact_location=artifacts or None,
            audit_db_url=audit,
            experiment=e.get("QUANTGATE_EXPERIMENT") or DEFAULT_EXPERIMENT,
            model_name=e.get("QUANTGATE_MODEL_NAME") or None,
            store_dir=store,
        )

    def with_(self, **changes: object) -> "RegistrySettings":
        """A copy with some fields changed (CLI flags over environment)."""
        return replace(self, **changes)  # type: ignore[arg-type]

    def ensure_local_dirs(self) -> None:
        """Create the folders an embedded SQLite store and its artifact root need."""
        for uri in (self.tracking_uri, self.registry_uri, self.audit_db_url):
            if uri.startswith("sqlite:///"):
                Path(uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
        if self.artifact_location and self.artifact_location.startswith("file://"):
            from urllib.parse import urlparse
            from urllib.request import url2pathname

            Path(url2pathname(urlparse(self.artifact_location).path)).mkdir(parents=True, exist_ok=True)


def _is_local_db(uri: str) -> bool:
    return uri.startswith("sqlite:")


def default_audit_url(tracking_uri: str, store: Path) -> str:
    """The audit trail shares MLflow's backend: a SQLite file beside MLflow's, or the same PostgreSQL database."""
    if tracking_uri.startswith("sqlite:///"):
        return f"sqlite:///{Path(tracking_uri[len('sqlite:///'):]).parent / 'audit.db'}"
    if tracking_uri.startswith(("postgresql:", "postgresql+", "postgres:")):
        return tracking_uri.replace("postgres://", "postgresql://", 1)
    return f"sqlite:///{store / 'audit.db'}"  # http(s)/file stores: keep the trail locally unless told otherwise


__all__ = ["RegistrySettings", "default_audit_url", "DEFAULT_STORE_DIR", "DEFAULT_EXPERIMENT"]
