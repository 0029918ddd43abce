"""Content identity: canonical JSON, SHA-256 of text, and streamed SHA-256 of files cached by (path, size, mtime)."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable

_CHUNK = 4 * 1024 * 1024
_CACHE_NAME = "sha256_cache.json"


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the form every content key is hashed over."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def sha256_text(text: str) -> str:
    """SHA-256 (hex) of a text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_dir() -> Path:
    """The cache folder: $QUANTGATE_CACHE_DIR, else ~/.cache/quantgate."""
    env = os.environ.get("QUANTGATE_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "quantgate"


def load_json_cache(path: Path) -> dict:
    """A small JSON cache file (file hashes, fingerprints): {} when missing or unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def store_json_cache(path: Path, data: dict) -> None:
    """Replace a JSON cache file atomically; an unwritable cache is ignored (it only costs a recomputation)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        pass


def _sha256_stream(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: "str | os.PathLike[str]") -> str:
    """SHA-256 (hex) of one file, streamed in 4 MiB chunks; cached under cache_dir() keyed by
    (resolved path, size, mtime_ns) so an unchanged file is hashed once and a changed one is re-hashed."""
    p = Path(path).resolve()
    st = p.stat()
    key = str(p)
    cache_file = cache_dir() / _CACHE_NAME
    cache = load_json_cache(cache_file)
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("size") == st.st_size and hit.get("mtime_ns") == st.st_mtime_ns:
        digest = hit.get("sha256")
        if isinstance(digest, str) and len(digest) == 64:
            return digest
    digest = _sha256_stream(p)
    cache = load_json_cache(cache_file)  # re-read: another process may have added entries meanwhile
    cache[key] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    store_json_cache(cache_file, cache)
    return digest


def remember_file_sha256(path: "str | os.PathLike[str]", digest: str) -> None:
    """Record the SHA-256 of a file this process has just written (and hashed while writing) in file_sha256's
    cache, so the next step that needs its identity (quantize from a convert output, validate) does not read the
    whole file again. Keyed like file_sha256: a later change of the file (size or mtime) misses the entry."""
    p = Path(path).resolve()
    st = p.stat()
    cache_file = cache_dir() / _CACHE_NAME
    cache = load_json_cache(cache_file)
    cache[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    store_json_cache(cache_file, cache)


def checkpoint_sha256(files: Iterable["str | os.PathLike[str]"]) -> str:
    """Identity of a multi-file checkpoint. Rule: for one file, that file's SHA-256; for several, the SHA-256 of
    the UTF-8 text made of one line "relname\\0filehash\\n" per file, sorted by relname, where relname is the
    file's path relative to the files' common folder (POSIX separators) and filehash its hex SHA-256."""
    paths = [Path(f).resolve() for f in files]
    if not paths:
        raise ValueError("checkpoint_sha256 needs at least one file")
    if len(paths) == 1:
        return file_sha256(paths[0])
    root = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return combined_sha256({p.relative_to(root).as_posix(): file_sha256(p) for p in paths})


def combined_sha256(digests: "dict[str, str]") -> str:
    """checkpoint_sha256's rule for several files, from their digests: SHA-256 of one "relname\0filehash\n" line
    per file, sorted by relname (lets a writer name the set it just hashed without reading it back)."""
    h = hashlib.sha256()
    for rel, digest in sorted(digests.items()):
        h.update(f"{rel}\0{digest}\n".encode("utf-8"))
    return h.hexdigest()
