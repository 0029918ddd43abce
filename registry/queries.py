"""Registry queries: list, show, resolve and download versions, attach files to a version's run, export its audit
events."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from core.atomic import atomic_write_text
from core.hashing import file_sha256
from registry.audit import AuditLog, iter_jsonl
from registry.client import (
    RegistryError,
    get_version,
    gguf_artifact_uri,
    mlflow_client,
    resolve,
    sanitize_name,
)
from registry.config import RegistrySettings


def download(ref: str, out_dir: "str | os.PathLike[str]", *, settings: RegistrySettings | None = None) -> Path:
    """Fetch a version's GGUF (MODEL@ALIAS or MODEL/VERSION) into out_dir, check its SHA-256, audit it."""
    import mlflow


    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s)
    mv = resolve(client, ref)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    target = out / mv.tags["gguf_file"]
    with tempfile.TemporaryDirectory(prefix=".quantgate-dl-", dir=out) as tmp:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=gguf_artifact_uri(client, mv), dst_path=tmp))
        sha = file_sha256(got)
        if sha != mv.tags.get("sha256"):
            raise RegistryError(f"downloaded {got.name} has SHA-256 {sha}, the registry says {mv.tags.get('sha256')}")
        os.replace(got, target)
    with AuditLog(s.audit_db_url) as log:
        log.append("download", model=mv.name, version=mv.version, artifact_sha256=sha, job_key=mv.tags.get("job_key"),
                   inputs=[{"role": "model_version", "uri": ref}],
                   outputs=[{"role": "gguf", "path": str(target), "sha256": sha}],
                   verdict=mv.tags.get("verdict"), detail=f"downloaded {ref} to {target}")
    return target


def list_models(settings: RegistrySettings | None = None) -> list[dict[str, Any]]:
    """Registered models with their aliases and number of versions."""
    client = mlflow_client(settings or RegistrySettings.from_env())
    out = []
    for rm in client.search_registered_models():
        versions = client.search_model_versions(f"name='{rm.name}'")
        out.append({"name": rm.name, "versions": len(versions), "aliases": dict(rm.aliases or {}),
                    "source_sha256": (rm.tags or {}).get("source_sha256", "")})
    return out


def version_info(client: Any, mv: Any) -> dict[str, Any]:
    """A version as a plain dict: tags, aliases, run, source."""
    return {"name": mv.name, "version": str(mv.version), "aliases": list(mv.aliases or []), "tags": dict(mv.tags),
            "run_id": mv.run_id, "source": mv.source, "status": mv.status,
            "created": mv.creation_timestamp, "description": mv.description}


def show(model: str, version: str | None = None, *, settings: RegistrySettings | None = None) -> list[dict]:
    """One version's details, or every version of a model (oldest first)."""
    client = mlflow_client(settings or RegistrySettings.from_env())
    if version is not None:
        return [version_info(client, get_version(client, model, version))]
    versions = client.search_model_versions(f"name='{model}'")
    if not versions:
        raise RegistryError(f"no registered model {model!r} (or it has no versions)")
    # search results carry no aliases: fetch each version
    return [version_info(client, client.get_model_version(model, v.version))
            for v in sorted(versions, key=lambda v: int(v.version))]


def attach_to_version(client: Any, mv: Any, path: Path, folder: str) -> None:
    """Store a file beside a version: as an artifact of the version's run, under `folder`."""
    client.log_artifact(mv.run_id, str(path), folder)


def run_artifact_text(settings: RegistrySettings, run_id: str, artifact_path: str) -> str | None:
    """Text of one run artifact, or None when it is not there."""
    import mlflow

    try:
        with tempfile.TemporaryDirectory(prefix="quantgate-art-") as tmp:
            p = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=artifact_path, dst_path=tmp,
                                                    tracking_uri=settings.tracking_uri)
            return Path(p).read_text(encoding="utf-8")
    except Exception:  # noqa: BLE001 - missing artifact: MlflowException or OSError depending on the store
        return None


def iter_run_artifacts(client: Any, run_id: str, path: str = "") -> Iterator[str]:
    """Paths of every file artifact of a run."""
    for a in client.list_artifacts(run_id, path or None):
        if a.is_dir:
            yield from iter_run_artifacts(client, run_id, a.path)
        else:
            yield a.path


def export_events(model: str, version: str | int | None, out: "str | os.PathLike[str] | None" = None, *,
                  settings: RegistrySettings | None = None, attach: bool = True) -> tuple[Path, int]:
    """Write a model's (or one version's, with its artifact's and job's) audit events as JSONL, atomically;
    attach the file to the version's run (audit/). Returns the path and the number of events."""

    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s)
    mv = get_version(client, model, version) if version is not None else None
    with AuditLog(s.audit_db_url) as log:
        if mv is not None:
            events = log.events(model=model, version=mv.version, artifact_sha256=mv.tags.get("sha256"),
                                job_key=mv.tags.get("job_key"))
        else:
            events = log.events(model=model)
    suffix = f"-v{mv.version}" if mv is not None else ""
    path = Path(out) if out is not None else Path(f"audit-{sanitize_name(model)}{suffix}.jsonl")
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, "".join(iter_jsonl(events)))
    if attach:
        targets = [mv] if mv is not None else client.search_model_versions(f"name='{model}'")
        for t in targets:
            attach_to_version(client, t, path, "audit")
    return path, len(events)
