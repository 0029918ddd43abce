"""Registry basics: the MLflow client, model names and references, verdict states, and the registry's errors."""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Iterator

from core.errors import QuantGateError, ServiceUnavailable
from core.records import Verdict
from core.text import one_line
from registry.config import RegistrySettings

PASSED, FAILED, UNVALIDATED = "passed", "failed", "unvalidated"


REPORT_ROLES = ("validation_json", "validation_html", "validation_md", "junit", "diff", "profile", "audit", "imatrix")


_ALIAS_RE = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class RegistryError(QuantGateError):
    """A registry operation that cannot be done as asked (unknown model, version, alias...)."""


class RegistryUnreachable(RegistryError, ServiceUnavailable):
    """The MLflow tracking / registry server could not be reached (refused, timed out, unknown host): transient."""


class PromotionRefused(RegistryError):
    """An alias was asked for a version that did not pass the validation gate."""


class VerdictRefused(RegistryError):
    """A registration brought a verdict that quantgate's own validation (the audit chain) does not back."""


#: HTTP limits for interactive read commands (models list/show/download) unless the user set MLflow's own
#: variables: MLflow's defaults (120 s timeout, 7 retries with backoff) made `models list` hang for minutes.
QUICK_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "10", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


def mlflow_client(settings: RegistrySettings, *, quick: bool = False) -> Any:
    """An MlflowClient on the settings' tracking and registry URIs (imports mlflow; telemetry off). quick=True (CLI
    read commands): HTTP requests time out after 10 s with one retry (QUICK_HTTP_ENV; the user's MLFLOW_HTTP_*
    variables win), so an unreachable server is reported in seconds; see `unreachable_as_error`."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # MLflow's own tqdm bars count files ("Downloading artifacts 1/1"), not bytes, except on cloud stores: ours
    # (registry.transfer, drawn by the CLI) report bytes on every store; set it to true to get theirs as well
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    if quick:
        for k, v in QUICK_HTTP_ENV.items():
            os.environ.setdefault(k, v)
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
        raise_unreachable(e, client)  # a server that is down is not a missing version
        raise RegistryError(f"no version {version} of registered model {name!r}") from e


#: MLflow's own spelling of a registry reference (`models:/NAME@ALIAS`, `models:/NAME/VERSION`); accepted with or
#: without the prefix wherever quantgate takes a model reference.
MODELS_PREFIX = "models:/"


def parse_model_ref(ref: str) -> tuple[str, str | None, str | None]:
    """'NAME@ALIAS' -> (name, None, alias); 'NAME/VERSION' or 'NAME:VERSION' -> (name, version, None); each also
    with MLflow's `models:/` prefix."""
    ref = ref.removeprefix(MODELS_PREFIX)
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
            raise_unreachable(e, client)
            raise RegistryError(f"registered model {name!r} has no alias {alias!r}") from e
    if ver:
        return get_version(client, name, ver)
    raise RegistryError(f"{ref!r}: expected MODEL@ALIAS or MODEL/VERSION")


_BAD_NAME_CHARS = re.compile(r"[\x00-\x1f\x7f/\\:]")


def safe_gguf_file(mv: Any) -> str:
    """The version's `gguf_file` tag when it is a plain file name (no folder, no `..`, no control characters, not
    hidden, ending in .gguf); anything else is refused: tags are editable by anyone with registry write access."""
    if "gguf_file" not in mv.tags:
        raise RegistryError(f"{mv.name} v{mv.version} was not registered by quantgate (no gguf_file tag)")
    name = mv.tags["gguf_file"]
    if (not isinstance(name, str) or not name.lower().endswith(".gguf") or name.startswith(".")
            or _BAD_NAME_CHARS.search(name) or os.path.basename(name) != name or len(name) > 255):
        raise RegistryError(f"{one_line(mv.name, 100)} v{mv.version}: refusing gguf_file tag {one_line(repr(name), 200)}"
                            ": not a plain file name ending in .gguf")
    return name


def gguf_artifact_uri(client: Any, mv: Any) -> str:
    """URI of the GGUF inside the version's pyfunc model (the artifact MLflow stores once)."""
    name = safe_gguf_file(mv)
    model_id = getattr(mv, "model_id", None) or str(mv.source).removeprefix("models:/")
    loc = client.get_logged_model(model_id).artifact_location.rstrip("/")
    return f"{loc}/artifacts/{name}"


_UNREACHABLE = ("Max retries exceeded", "Connection refused", "timed out", "Read timed out", "Failed to establish",
                "NameResolutionError", "Name or service not known", "RemoteDisconnected", "Connection aborted",
                "Connection reset")


def _reason(msg: str) -> str:
    for needle in ("Connection refused", "Read timed out", "timed out", "Name or service not known",
                   "NameResolutionError", "Connection reset", "RemoteDisconnected", "Connection aborted"):
        if needle in msg:
            return needle.lower() if needle != "NameResolutionError" else "name not resolved"
    return "no answer"


@contextlib.contextmanager
def unreachable_as_error(settings: RegistrySettings) -> Iterator[None]:
    """Turn "the MLflow server cannot be reached" (refused, timed out, unknown host) into one RegistryUnreachable
    line: `MLflow at URI unreachable (reason)` (a RegistryError, and a ServiceUnavailable that Celery tasks retry).
    Other errors pass through unchanged."""
    try:
        yield
    except QuantGateError:
        raise
    except Exception as e:  # noqa: BLE001 - MlflowException or requests' errors, depending on where it failed
        raise_unreachable(e, settings.tracking_uri)
        raise


def unreachable_reason(e: BaseException) -> str | None:
    """Why the MLflow server could not be reached when `e` says so (refused, timed out, unknown host), else None."""
    msg = str(e)
    mod = type(e).__module__
    if (mod.startswith(("mlflow", "requests", "urllib3")) or isinstance(e, (ConnectionError, TimeoutError))) \
            and any(n in msg for n in _UNREACHABLE):
        return _reason(msg)
    return None


def raise_unreachable(e: BaseException, where: Any) -> None:
    """Raise RegistryUnreachable when `e` means the server at `where` (a URI, or an MlflowClient) could not be
    reached; return otherwise. For `except MlflowException` blocks that read a failure as "missing" or "exists"."""
    reason = unreachable_reason(e)
    if reason is None:
        return
    uri = where if isinstance(where, str) else (getattr(where, "_registry_uri", None)
                                                  or getattr(where, "tracking_uri", None) or "?")
    raise RegistryUnreachable(f"MLflow at {one_line(uri, 200)} unreachable ({reason})") from None
