"""Crash-safe file writes: a temp file next to the target, fsynced and renamed over it only on success."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Iterator

_BUFFER = 8 << 20  # big write buffer: tensor data goes out in large chunks


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # platforms (Windows) that cannot open a directory
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _default_mode(target: Path) -> int:
    try:
        return os.stat(target).st_mode & 0o7777
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


@contextlib.contextmanager
def atomic_write(path: "str | os.PathLike[str]") -> Iterator[BinaryIO]:
    """Yield a binary file on a temp file beside `path`; on success fsync + rename over `path`, else remove it.

    Readers never see a half-written artifact, and an existing target stays untouched when writing fails.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=folder)
    tmp = Path(tmp_name)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _default_mode(target))
        with os.fdopen(fd, "wb", buffering=_BUFFER) as f:
            fd = -1
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path: "str | os.PathLike[str]", text: str, encoding: str = "utf-8") -> None:
    """Atomically replace `path` with `text` encoded as `encoding` (UTF-8 by default)."""
    atomic_write_bytes(path, text.encode(encoding))


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_text"]
