"""Registry queries: list, show, resolve and download versions, attach files to a version's run, export its audit
events."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from core.atomic import atomic_publish_many, atomic_write_text
from core.hashing import combined_sha256, file_sha256
from core.progress import ProgressFn, transfer_progress
from core.text import one_line
from quant.gguf_split import parse_part_name, split_path
from registry.audit import AuditLog, iter_jsonl
from registry.client import (
    RegistryError,
    get_version,
    gguf_artifact_uri,
    mlflow_client,
    resolve,
    safe_gguf_file,
    sanitize_name,
    unreachable_as_error,
)
from registry.config import RegistrySettings
from registry.transfer import watch_tree


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def _target_inside(root: Path, name: str) -> Path:
    """root/name, refused when it resolves (an existing symlink followed) anywhere but directly inside root."""
    target = root / name
    if target.resolve().parent != root or (target.exists() and not target.is_file()):
        raise RegistryError(f"download target {one_line(target, 200)} resolves outside {one_line(root, 200)} "
                            "(or is not a file); refused")
    return target


def _expected_size(client: Any, mv: Any) -> int:
    try:
        return int(client.get_run(mv.run_id).data.metrics.get("file_size_bytes") or 0)
    except Exception:  # noqa: BLE001 - only the progress total; an unknown size shows as a spinner
        return 0


def gguf_file_name(ref: str, *, settings: RegistrySettings | None = None) -> str:
    """The file name a version's GGUF downloads as (a split GGUF: its first part's, OUT-00001-of-0000N.gguf): lets a
    caller that needs one file refuse a split version before fetching anything."""
    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s, quick=True)
    with unreachable_as_error(s):
        return safe_gguf_file(resolve(client, ref))


def download(ref: str, out_dir: "str | os.PathLike[str]", *, settings: RegistrySettings | None = None,
             progress: ProgressFn | None = None) -> Path:
    """Fetch a version's GGUF (MODEL@ALIAS or MODEL/VERSION) into out_dir, check its SHA-256, audit it; for a split
    GGUF every part (the set's SHA-256 is core.hashing's rule over each part's), returning the first part's path.

    The file lands only directly inside out_dir: the `gguf_file` tag must be a plain file name (registry.client.
    safe_gguf_file), the final path is checked after resolving symlinks, the bytes go to a temp folder inside
    out_dir, are hashed and fsynced there, and are renamed into place only when the SHA-256 matches the registry's.
    MLflow copies in chunks (memory stays flat for a GGUF of many GB: docs/BENCHMARKS.md); `progress(done, total,
    file)` gets the bytes received twice a second (default: the receiver core.progress.reporting_transfers
    installed, e.g. the CLI's bar).
    """
    import mlflow

    progress = progress if progress is not None else transfer_progress()
    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s, quick=True)
    with unreachable_as_error(s):
        mv = resolve(client, ref)
        name = safe_gguf_file(mv)
        uri = gguf_artifact_uri(client, mv)
        total = _expected_size(client, mv) if progress is not None else 0
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    root = out.resolve()
    named = parse_part_name(name)  # a split GGUF: gguf_file names its first part; every part is fetched
    names = [split_path(named[0], i, named[2]).name for i in range(named[2])] if named else [name]
    targets = [_target_inside(root, n) for n in names]
    with tempfile.TemporaryDirectory(prefix=".quantgate-dl-", dir=root) as tmp:
        got: list[Path] = []
        for n in names:
            with unreachable_as_error(s), watch_tree(Path(tmp), total, f"download {n}", progress):
                g = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rsplit('/', 1)[0]}/{n}",
                                                             dst_path=tmp))
            if g.is_symlink() or not g.is_file() or Path(tmp).resolve() not in g.resolve().parents:
                raise RegistryError(f"{ref}: the registry's artifact {one_line(n, 200)} is not a plain file; refused")
            got.append(g)
        digests = {g.name: file_sha256(g) for g in got}
        sha = combined_sha256(digests) if named else digests[got[0].name]
        if sha != mv.tags.get("sha256"):
            what = f"the {len(got)} downloaded parts have" if named else f"downloaded {one_line(got[0].name, 200)} has"
            raise RegistryError(f"{what} SHA-256 {sha}, the registry says {one_line(mv.tags.get('sha256'), 80)}")
        for g in got:
            _fsync(g)
        targets = [_target_inside(root, n) for n in names]  # again, just before the rename
        with atomic_publish_many(targets) as temps:  # the first part appears last
            for g, t in zip(got, temps):
                os.replace(g, t)
    _fsync(root, directory=True)
    target = targets[0]
    with AuditLog(s.audit_db_url) as log:
        log.append("download", model=mv.name, version=mv.version, artifact_sha256=sha, job_key=mv.tags.get("job_key"),
                   inputs=[{"role": "model_version", "uri": ref}],
                   outputs=[{"role": "gguf", "path": str(target), "sha256": sha}] + (
                       [{"role": f"gguf_part_{i + 1}", "path": str(t), "sha256": digests[t.name]}
                        for i, t in enumerate(targets)] if named else []),
                   verdict=mv.tags.get("verdict"), detail=f"downloaded {ref} to {target}")
    return target


def list_models(settings: RegistrySettings | None = None) -> list[dict[str, Any]]:
    """Registered models with their aliases and number of versions (an unreachable server: one RegistryError)."""
    s = settings or RegistrySettings.from_env()
    client = mlflow_client(s, quick=True)
    out = []
    with unreachable_as_error(s):
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
    s = settings or RegistrySettings.from_env()
    with unreachable_as_error(s):
        return _show(mlflow_client(s, quick=True), model, version)


def _show(client: Any, model: str, version: str | None) -> list[dict]:
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
    # MLflow only when a version is named or the file is attached: a plain `--no-attach` export reads the audit DB
    # alone and never creates (or migrates) an MLflow store as a side effect.
    client = mlflow_client(s) if version is not None or attach else None
    mv = get_version(client, model, version) if client is not None and version is not None else None
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
    if attach and client is not None:
        targets = [mv] if mv is not None else client.search_model_versions(f"name='{model}'")
        for t in targets:
            attach_to_version(client, t, path, "audit")
    return path, len(events)
