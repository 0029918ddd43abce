"""quantgate's one settings object: defaults < params.yaml (its `settings:` section) < QUANTGATE_* < CLI flags.

The defaults run everything on one machine: the broker URL points at a local Redis for `submit`/`worker`, and an
empty (or `memory://`) broker URL makes Celery run the tasks in-process (eager), which is what `quantgate run` does.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

from pydantic import Field
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from core.errors import QuantGateError
from core.hashing import cache_dir
from core.safe_yaml import YAMLLimitError, load_yaml_file

DEFAULT_BROKER_URL = "redis://localhost:6379/0"
#: Broker URLs that mean "no broker: run the tasks in this process".
EMBEDDED_BROKERS = ("", "none", "memory://", "eager")


def _params_file() -> Path:
    return Path(os.environ.get("QUANTGATE_PARAMS", "params.yaml"))


class ParamsError(QuantGateError):
    """params.yaml cannot be used (unreadable, not a mapping, anchors/aliases, too big)."""


def read_params_file(path: Path) -> dict[str, Any]:
    """params.yaml as a dict ({} when there is no such file): bounded, alias-free YAML (core.safe_yaml)."""
    if not path.exists():
        return {}
    try:
        data = load_yaml_file(path, "params file")
    except FileNotFoundError:
        return {}
    except YAMLLimitError as e:
        raise ParamsError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ParamsError(f"cannot read params file {path}: {getattr(e, 'strerror', None) or e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(f"params file {path}: expected a mapping at the top, got {type(data).__name__}")
    return data


class _ParamsYamlSource(PydanticBaseSettingsSource):
    """The `settings:` mapping of params.yaml (the same file DVC reads), when the file exists."""

    def get_field_value(self, field: Any, field_name: str) -> tuple[Any, str, bool]:  # pragma: no cover - unused
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = read_params_file(_params_file())
        section = data.get("settings") if isinstance(data, dict) else None
        return {k: v for k, v in (section or {}).items() if k in self.settings_cls.model_fields}


def _default_cache_dir() -> Path:

    return cache_dir()


class Settings(BaseSettings):
    """Runtime configuration shared by the CLI, DVC stages and Celery workers (see the module docstring)."""

    model_config = SettingsConfigDict(env_prefix="QUANTGATE_", extra="ignore")

    broker_url: str = DEFAULT_BROKER_URL
    result_backend: Optional[str] = None        # None: the broker URL (Redis keeps results too)
    workdir: Path = Path("out/jobs")            # where job artifacts land, one folder per job key
    # Celery workers read models/datasets only under these folders (os.pathsep-separated; QUANTGATE_MODEL_ROOTS);
    # None: the worker's current directory. Workers write only under `workdir`. See docs/security/inputs.md.
    model_roots: Optional[str] = None
    cache_dir: Path = Field(default_factory=_default_cache_dir)
    mlflow_uri: Optional[str] = None            # passed through to the registry as QUANTGATE_MLFLOW_URI
    # Dead-worker recovery (docs/SCALING.md, "Dead workers"): a live worker renews its messages and task leases
    # every lease_renew_interval s, so the visibility timeout bounds only how long a DEAD worker's job waits.
    visibility_timeout: int = 60                # Redis: a dead worker's unacked message is back after this long
    lease_ttl: int = 30                         # a running task's lease outlives its last renewal by this long
    lease_renew_interval: int = 10              # renewal period (clamped to a third of the two above)
    soft_time_limit: int = 4 * 3600             # a task gets SoftTimeLimitExceeded after this many seconds
    time_limit: int = 4 * 3600 + 300            # ... and is killed after this many
    max_retries: int = 5                        # transient-error retries (broker/MLflow unreachable)
    retry_backoff_max: int = 300
    worker_concurrency: int = 2
    result_expires: int = 7 * 24 * 3600

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings):
        return (init_settings, env_settings, _ParamsYamlSource(settings_cls))

    @property
    def embedded(self) -> bool:
        """True when no broker is configured: tasks run eagerly in the calling process."""
        return self.broker_url.strip().lower() in EMBEDDED_BROKERS

    @property
    def model_root_paths(self) -> list[Path]:
        """The folders workers may read models and datasets from, resolved (symlinks followed); default: the
        current directory."""
        parts = [x for x in (self.model_roots or "").split(os.pathsep) if x.strip()]
        return [Path(x).expanduser().resolve() for x in parts] or [Path.cwd().resolve()]

    @property
    def backend_url(self) -> str:
        """The result backend: the configured one, else the broker itself."""
        return self.result_backend or self.broker_url

    def registry(self) -> Any:
        """The registry's settings (registry.config.RegistrySettings) with this object's mlflow_uri on top of the
        environment: what every runner (CLI, DVC stages, Celery) hands the registry and the audit trail."""
        from registry.config import RegistrySettings  # lazy: defers sqlalchemy

        env = dict(os.environ)
        if self.mlflow_uri:
            env["QUANTGATE_MLFLOW_URI"] = self.mlflow_uri
        return RegistrySettings.from_env(env)

    def export_env(self) -> None:
        """Make child code that reads the environment (registry, hashing cache) see these settings."""
        os.environ["QUANTGATE_CACHE_DIR"] = str(self.cache_dir)
        if self.mlflow_uri:
            os.environ["QUANTGATE_MLFLOW_URI"] = self.mlflow_uri


def registry_settings() -> Any:
    """RegistrySettings resolved through the one settings path (params.yaml `settings:` < QUANTGATE_*)."""
    return load_settings().registry()


def load_settings(**overrides: Any) -> Settings:
    """Resolve the settings; `overrides` are CLI flags (None values are ignored so absent flags do not win)."""
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


__all__ = ["Settings", "load_settings", "registry_settings", "DEFAULT_BROKER_URL", "EMBEDDED_BROKERS"]
