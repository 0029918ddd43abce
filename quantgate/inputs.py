"""Where a model comes from: one resolver for every command's model argument.

`resolve_model(value, repo=None, rev=None)` turns what a user typed into a local path to read, plus the lineage that
names it (written into the GGUF as `quantgate.source_ref` / `quantgate.source_lineage`, tagged in the registry,
shown in the compliance report):

1. `--model-repo REPO [--model-rev REV]`: `value` is a path inside a DVC-tracked git repository, fetched at that
   revision through `dvc.api.DVCFileSystem` (lineage: repo, revision, commit, path).
2. `models:/NAME/VERSION` or `models:/NAME@ALIAS`: an MLflow model version, downloaded from the registry (a
   quantgate GGUF version -> its GGUF, SHA-256 checked; a `mlflow.transformers` model or an artifact folder
   holding an HF checkpoint -> that folder).
3. An existing local file or folder: itself (a local folder named like `org/name` wins over the Hub id).
4. `org/name` that is not a local path: the snapshot in the local Hugging Face cache (offline lookup,
   HF_HUB_CACHE / HF_HOME; `--model-rev` picks a branch, tag or commit), else one error line.

Downloads go to `$QUANTGATE_CACHE_DIR/inputs/` (a temp folder renamed into place once complete), so a second run
reads the local copy. Nothing here loads weights: files are copied in chunks (bounded memory).
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import QuantGateError, ServiceUnavailable
from core.hashing import cache_dir, canonical_json, file_sha256, sha256_text
from core.text import one_line

#: What huggingface_hub accepts as a repo id (validate_repo_id): owner/name, letters, digits, '-', '_', '.'.
HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
MODELS_PREFIX = "models:/"
_DONE = ".quantgate-complete"
#: A git / Hub revision: a branch, tag, commit or `HEAD~1`-style expression; no `..`, no leading `-` or `/`.
REVISION = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./~^+-]{0,254}$")
MAX_REF_CHARS = 1024


class ModelInputError(QuantGateError):
    """A model reference that cannot be resolved (not cached, unknown version, unreachable repository...)."""


class ModelSourceUnreachable(ModelInputError, ServiceUnavailable):
    """The service holding a model reference (the MLflow registry) could not be reached: the reference may be
    fine, so a Celery task retries it (tasks.tasks.transient_guard); the CLI prints it as one error line."""


@dataclass(frozen=True)
class ModelInput:
    """A resolved model argument: the local path to read and where it came from."""

    path: Path
    ref: str                      # canonical reference (`models:/NAME/3`, `org/name@<commit>`, `REPO@<commit>:PATH`)
    kind: str                     # "path" | "hf" | "mlflow" | "dvc"
    name: str                     # the source's own name (registered-model and output naming)
    lineage: dict[str, Any] = field(default_factory=dict)

    @property
    def is_local(self) -> bool:
        """True for a plain path (no lineage beyond the file's own hash)."""
        return self.kind == "path"

    def lineage_json(self) -> str | None:
        """The lineage as canonical JSON (what the GGUF carries), None for a plain path."""
        return None if self.is_local else canonical_json({"kind": self.kind, "ref": self.ref, "name": self.name,
                                                           **self.lineage})

    def pin(self) -> dict[str, str | None]:
        """The resolve_model arguments that name exactly this source again, wherever it is resolved: the version
        (not the alias) of a `models:/` reference, the commit of a Hub id or of a DVC revision, a path as given."""
        lin = self.lineage
        if self.kind == "hf":
            return {"value": str(lin["repo_id"]), "repo": None, "rev": str(lin["commit"])}
        if self.kind == "dvc":
            return {"value": str(lin["path"]), "repo": str(lin["repo"]), "rev": str(lin["commit"])}
        return {"value": self.ref, "repo": None, "rev": None}

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "ref": self.ref, "kind": self.kind, "name": self.name,
                "lineage": dict(self.lineage)}


def _exists(text: str) -> bool:
    """Whether `text` names something on this machine's file system (a dangling symlink counts: it is local)."""
    try:
        p = Path(text)
        return p.exists() or p.is_symlink()
    except (OSError, ValueError):  # NUL bytes, over-long components
        return False


def check_reference(value: object, repo: object = None, rev: object = None) -> None:
    """Refuse a model reference that no resolver step may see (ModelInputError): not text, empty, over-long,
    control characters (except in the name of a file that exists here), or a revision that is not a plain git/Hub
    revision (`..`, a leading `-`). What a Celery worker or a DVC stage reads from a message or source.json passes
    the same checks as a command-line value."""
    for what, v, limit in (("model", value, MAX_REF_CHARS), ("--model-repo", repo, MAX_REF_CHARS),
                           ("--model-rev", rev, 255)):
        if v is None and what != "model":
            continue
        if not isinstance(v, (str, os.PathLike)):
            raise ModelInputError(f"{what}: expected text, got {type(v).__name__}")
        t = os.fspath(v)
        # a file that exists here may have any name (it is printed escaped everywhere); a reference may not
        local = what == "model" and isinstance(t, str) and bool(t) and len(t) <= limit and _exists(t)
        if not isinstance(t, str) or not t or len(t) > limit or (
                not local and any(ord(c) < 32 or ord(c) == 127 for c in t)):
            raise ModelInputError(f"{what} {one_line(t, 200)!r}: empty, longer than {limit} characters, or "
                                  "holding control characters")
    if rev is not None and (not REVISION.match(str(rev)) or ".." in str(rev)):
        raise ModelInputError(f"--model-rev {one_line(rev, 80)!r}: not a git or Hub revision (a branch, tag or "
                              "commit)")


def names_remote_source(value: "str | os.PathLike[str]", repo: str | None = None) -> bool:
    """Whether a model argument names a source any machine can resolve (a `models:/` version, a Hub id that is
    not a local path here, a path in a --model-repo) rather than a local path of this machine."""
    text = os.fspath(value)
    if repo or text.startswith(MODELS_PREFIX):
        return True
    return not _exists(text) and bool(HF_REPO_ID.match(text))


def is_repo_url(repo: str) -> bool:
    """Whether a --model-repo value is a git URL (`https://...`, `ssh://...`, `git@host:path`) rather than a path."""
    return "://" in repo or bool(re.match(r"^[\w.-]+@[\w.-]+:", repo))


def resolve_model(value: "str | os.PathLike[str]", *, repo: str | None = None, rev: str | None = None,
                  settings: Any = None) -> ModelInput:
    """Resolve a model argument (see the module docstring for the order); bad references raise ModelInputError."""
    check_reference(value, repo, rev)
    text = os.fspath(value)
    if repo:
        return _from_dvc(text, repo, rev)
    if text.startswith(MODELS_PREFIX):
        if rev:
            raise ModelInputError("--model-rev applies to a DVC repository (--model-repo) or a Hub id, not to "
                                  f"{one_line(text, 200)}")
        return _from_mlflow(text, settings)
    p = Path(text)
    if _exists(text) or not HF_REPO_ID.match(text):
        if rev:
            raise ModelInputError(f"--model-rev needs --model-repo (DVC) or a Hub id; {one_line(text, 200)} is a "
                                  "local path")
        return ModelInput(p, text, "path", _stem(p))
    return _from_hf_cache(text, rev)


def _stem(p: Path) -> str:
    return p.name.removesuffix(".gguf") or p.name or "model"


# ---------------------------------------------------------------------------------------------- Hugging Face cache


def hf_hub_cache() -> Path:
    """The Hub cache folder huggingface_hub uses, read from the environment now (HF_HUB_CACHE, else
    HUGGINGFACE_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def _from_hf_cache(repo_id: str, rev: str | None) -> ModelInput:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hf_hub_cache()
    try:
        snap = Path(snapshot_download(repo_id, revision=rev, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, ValueError) as e:
        at = f" at revision {one_line(rev, 80)}" if rev else ""
        raise ModelInputError(
            f"{one_line(repo_id, 200)} is not a local path and not in the Hugging Face cache{at} "
            f"({one_line(cache, 200)}); fetch it first: huggingface-cli download {one_line(repo_id, 200)}"
            + (f" --revision {one_line(rev, 80)}" if rev else "")) from (None if isinstance(e, ValueError) else e)
    commit = snap.name
    return ModelInput(snap, f"{repo_id}@{commit}", "hf", repo_id.split("/", 1)[1],
                      {"repo_id": repo_id, "revision": rev or "main", "commit": commit})


# ---------------------------------------------------------------------------------------------- MLflow registry


def _from_mlflow(ref: str, settings: Any) -> ModelInput:
    from registry.client import (  # lazy: defers mlflow until a models:/ reference is used
        RegistryError,
        mlflow_client,
        resolve,
        unreachable_as_error,
    )

    if settings is None:
        from quantgate.config import registry_settings  # lazy: pydantic settings only when the registry is used

        settings = registry_settings()
    client = mlflow_client(settings, quick=True)
    try:
        with unreachable_as_error(settings):
            mv = resolve(client, ref)
    except RegistryError as e:
        kind = ModelSourceUnreachable if isinstance(e, ServiceUnavailable) else ModelInputError
        raise kind(f"{one_line(ref, 200)}: {e}") from None
    canonical = f"{MODELS_PREFIX}{mv.name}/{mv.version}"
    lineage = {"model": mv.name, "version": str(mv.version), "run_id": mv.run_id or ""}
    alias = ref.removeprefix(MODELS_PREFIX).rpartition("@")[2] if "@" in ref else None
    if alias:
        lineage["alias"] = alias
    if "gguf_file" in (mv.tags or {}):  # a quantgate GGUF version: the registry's checked download
        path = _download_gguf(canonical, mv, settings)
        lineage["sha256"] = mv.tags.get("sha256", "")
        return ModelInput(path, canonical, "mlflow", mv.name, lineage)
    folder = _cached_download(("mlflow", settings.tracking_uri, mv.name, str(mv.version), mv.run_id or ""),
                              lambda tmp: _download_version(client, settings, mv, tmp))
    return ModelInput(_hf_folder(folder, canonical), canonical, "mlflow", mv.name, lineage)


def _download_gguf(canonical: str, mv: Any, settings: Any) -> Path:
    from registry.queries import download  # lazy: the audit trail's SQLAlchemy, MLflow

    folder = cache_dir() / "inputs" / "gguf" / (mv.tags.get("sha256") or sha256_text(canonical))[:32]
    name = mv.tags.get("gguf_file", "")
    have = folder / name
    if name and have.is_file() and not have.is_symlink() and file_sha256(have) == mv.tags.get("sha256"):
        return have
    return download(canonical.removeprefix(MODELS_PREFIX), folder, settings=settings)


def _download_version(client: Any, settings: Any, mv: Any, dst: Path) -> None:
    import mlflow

    from registry.client import unreachable_as_error  # lazy: defers mlflow

    uri = client.get_model_version_download_uri(mv.name, str(mv.version))
    with unreachable_as_error(settings):
        mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst), tracking_uri=settings.tracking_uri)


def _hf_folder(folder: Path, ref: str) -> Path:
    """The HF checkpoint inside a downloaded model: `model/` (mlflow.transformers with a local checkpoint), the
    root (an artifact folder logged as the model), or the one sub-folder holding config.json."""
    for cand in (folder / "model", folder):
        if (cand / "config.json").is_file():
            return cand
    found = sorted(p.parent for p in folder.glob("*/config.json"))
    if len(found) == 1:
        return found[0]
    raise ModelInputError(f"{one_line(ref, 200)} holds no Hugging Face checkpoint (no config.json in model/ or at "
                          "the root) and is not a quantgate GGUF version")


# ---------------------------------------------------------------------------------------------- DVC


def _from_dvc(path: str, repo: str, rev: str | None) -> ModelInput:
    from dvc.api import DVCFileSystem
    from scmrepo.exceptions import SCMError

    norm = os.path.normpath(path.strip("/"))
    if not path or norm.startswith("..") or os.path.isabs(path):
        raise ModelInputError(f"--model {one_line(path, 200)}: give a path inside the --model-repo repository")
    commit = _git_commit(repo, rev)
    try:
        fs = DVCFileSystem(repo, rev=commit)
        if not fs.exists(norm):
            raise ModelInputError(f"{one_line(norm, 200)} does not exist in {one_line(repo, 200)} at "
                                  f"{one_line(rev or 'HEAD', 80)}")
        info = fs.info(norm)
    except ModelInputError:
        raise
    except (SCMError, OSError, ValueError) as e:
        raise ModelInputError(f"DVC repository {one_line(repo, 200)} at {one_line(rev or 'HEAD', 80)}: "
                              f"{one_line(e, 300)}") from None
    md5 = (info.get("dvc_info") or {}).get("md5") or ""

    def fetch(tmp: Path) -> None:
        target = tmp / Path(norm).name
        try:
            fs.get(norm, str(target), recursive=info.get("type") == "directory")
        except Exception as e:  # noqa: BLE001 - dvc raises its own errors for a missing remote / cache object
            raise ModelInputError(f"cannot fetch {one_line(norm, 200)} from {one_line(repo, 200)}@{commit[:12]}: "
                                  f"{one_line(e, 300)} (is its DVC remote reachable?)") from None

    folder = _cached_download(("dvc", repo, commit, norm), fetch)
    lineage = {"repo": repo, "rev": rev or "HEAD", "commit": commit, "path": norm}
    if md5:
        lineage["md5"] = md5
    return ModelInput(folder / Path(norm).name, f"{repo}@{commit}:{norm}", "dvc", _stem(Path(norm)), lineage)


def _git_commit(repo: str, rev: str | None) -> str:
    """The full commit SHA a revision names in the repository (a local path or a git URL)."""
    from scmrepo.git import Git

    try:
        if os.path.isdir(repo):
            return Git(repo).resolve_rev(rev or "HEAD")
        from dvc.repo import Repo

        with Repo.open(repo, rev=rev) as r:
            return r.scm.get_rev()
    except Exception as e:  # noqa: BLE001 - scmrepo's RevError, git errors, an unreachable URL
        raise ModelInputError(f"--model-repo {one_line(repo, 200)}: cannot resolve revision "
                              f"{one_line(rev or 'HEAD', 80)} ({one_line(e, 200)})") from None


# ---------------------------------------------------------------------------------------------- download cache


def _cached_download(key: tuple[str, ...], fetch: Any) -> Path:
    """A folder in the inputs cache named by `key`: fetched once into a temp folder, renamed when complete."""
    root = cache_dir() / "inputs" / key[0]
    folder = root / sha256_text("\n".join(key))[:32]
    if (folder / _DONE).is_file():
        return folder
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=root))
    try:
        fetch(tmp)
        (tmp / _DONE).write_text(canonical_json(list(key)), encoding="utf-8")
        if folder.exists():  # a half folder of an older version of this code, or a concurrent fetch that won
            if (folder / _DONE).is_file():
                return folder
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


__all__ = ["ModelInput", "ModelInputError", "ModelSourceUnreachable", "resolve_model", "check_reference",
           "names_remote_source", "is_repo_url", "hf_hub_cache", "HF_REPO_ID"]
