"""Registry basics: the MLflow client, model names and references, verdict states, and the registry's errors."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from core.errors import QuantGateError
from core.records import Verdict
from registry.config import RegistrySettings

PASSED, FAILED, UNVALIDATED = "passed", "failed", "unvalidated"


REPORT_ROLES = ("validation_json", "validation_html", "junit", "diff", "profile", "audit", "imatrix")


_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class RegistryError(QuantGateError):
    """A registry operation that cannot be done as asked (unknown model, version, alias...)."""


class PromotionRefused(RegistryError):
    """An alias was asked for a version that did not pass the validation gate."""


class VerdictRefused(RegistryError):
    """A registration brought a verdict that quantgate's own validation (the audit chain) does not back."""


def mlflow_client(settings: RegistrySettings) -> Any:
    """An MlflowClient on the settings' tracking and registry URIs (imports mlflow; telemetry off)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    settings.ensure_local_dirs()
    import mlflow
    from mlflow import MlflowClient

    # set_*_uri also export MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI: keep the process environment as it was, so
    # the next RegistrySettings.from_env() (another job in this worker, another command) is not steered by this one
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_registry_uri(settings.registry_uri)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    return MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.registry_uri)


def sanitize_name(s: str) -> str:
    """A registered-model / metric-safe name: letters, digits, '-', '_', '.'; other runs become '-'."""
    out = re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-.")
    return out or "model"


def _key(s: str) -> str:
    s = s.replace("<=", "_le_").replace(">=", "_ge_").replace("==", "_eq_").replace("<", "_lt_").replace(">", "_gt_")
    return re.sub(r"[^A-Za-z0-9_./ -]+", "_", s)[:240]


def default_model_name(source_name: str, source_sha256: str | None) -> str:
    """One registered model per source: sanitized source name + the first 8 hex digits of its SHA-256."""
    base = sanitize_name(Path(source_name.rstrip("/\\")).name or source_name)
    return f"{base}-{source_sha256[:8]}" if source_sha256 else base


def verdict_status(verdict: Verdict | None) -> str:
    return UNVALIDATED if verdict is None else (PASSED if verdict.passed else FAILED)


def get_version(client: Any, name: str, version: str | int) -> Any:
    """The MLflow model version, or a RegistryError naming what is missing."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, str(version))
    except MlflowException as e:
        raise RegistryError(f"no version {version} of registered model {name!r}") from e


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'NAME@ALIAS' -> (name, None, alias); 'NAME/VERSION' or 'NAME:VERSION' -> (name, version, None)."""
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, None, alias
    for sep in ("/", ":"):
        if sep in ref and ref.rsplit(sep, 1)[1].isdigit():
            name, ver = ref.rsplit(sep, 1)
            return name, ver, None
    return ref, None, None


def resolve(client: Any, ref: str) -> Any:
    """The model version a reference names (NAME@ALIAS, NAME/VERSION)."""
    from mlflow.exceptions import MlflowException

    name, ver, alias = parse_model_ref(ref)
    if alias:
        try:
            return client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            raise RegistryError(f"registered model {name!r} has no alias {alias!r}") from e
    if ver:
        return get_version(client, name, ver)
    raise RegistryError(f"{ref!r}: expected MODEL@ALIAS or MODEL/VERSION")


def gguf_artifact_uri(client: Any, mv: Any) -> str:
    """URI of the GGUF inside the version's pyfunc model (the artifact MLflow stores once)."""
    if "gguf_file" not in mv.tags:
        raise RegistryError(f"{mv.name} v{mv.version} was not registered by quantgate (no gguf_file tag)")
    model_id = getattr(mv, "model_id", None) or str(mv.source).removeprefix("models:/")
    loc = client.get_logged_model(model_id).artifact_location.rstrip("/")
    return f"{loc}/artifacts/{mv.tags['gguf_file']}"
