"""Crash-safe file writes: a temp file next to the target, fsynced and renamed over it only on success."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

_BUFFER = 8 << 20  # big write buffer: tensor data goes out in large chunks
#: Temp files are named .TARGET.<host8>-<pid>.<random>.tmp: the writer's host and PID, so a later write into the
#: same folder can remove the leftovers of a writer that died (SIGKILL, SIGTERM, power loss) on this host.
_TEMP_RE = re.compile(r"^\..+\.(?P<host>[0-9a-f]{8})-(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp$")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never guess about a PID we cannot check
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale_temps(folder: "str | os.PathLike[str]") -> list[Path]:
    """Remove temp files in `folder` left by atomic writers of this host whose process is gone; returns them.

    Temps of live writers, of other hosts (shared storage) and files of any other name are never touched."""
    me, host = os.getpid(), _host_tag()
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if not m or m["host"] != host or int(m["pid"]) == me or _pid_alive(int(m["pid"])):
            continue
        try:
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            continue  # removed meanwhile by another writer, or not ours to remove
    return removed


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
def atomic_write(path: "str | os.PathLike[str]",
                 before_replace: Callable[[Path], None] | None = None) -> Iterator[BinaryIO]:
    """Yield a binary file on a temp file beside `path`; on success fsync + rename over `path`, else remove it.

    Readers never see a half-written artifact, and an existing target stays untouched when writing fails.
    `before_replace(temp_path)` runs after the data is durable and before the rename: whatever it records (an
    audit event) exists before the file becomes visible; if it raises, the temp file is removed and nothing is
    published. Temps left by dead writers of this host in the same folder are removed first.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    clean_stale_temps(folder)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.{_host_tag()}-{os.getpid()}.", suffix=".tmp",
                                    dir=folder)
    tmp = Path(tmp_name)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, _default_mode(target))
        with os.fdopen(fd, "wb", buffering=_BUFFER) as f:
            fd = -1
            yield f  # type: ignore[misc]
            f.flush()
            os.fsync(f.fileno())
        if before_replace is not None:
            before_replace(tmp)
        os.replace(tmp, target)
    except BaseException:
        if fd != -1:
            os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(folder)


@contextlib.contextmanager
def atomic_publish_many(paths: "Sequence[str | os.PathLike[str]]", *, first_last: bool = True) -> Iterator[list[Path]]:
    """Yield one temp path per target (beside it, named like atomic_write's temps, so a dead writer's are removed
    by the next write into the folder); the caller writes each completely (atomic_write/write_gguf fsync them).
    On success the temps are renamed onto the targets, the first target last when `first_last` (for file sets that
    are opened through their first file: it appears only once all others are in place). On any failure every temp
    and every target already renamed in this call are removed, and earlier files at the targets are lost only
    for targets already renamed."""
    targets = [Path(p) for p in paths]
    temps = []
    for t in targets:
        folder = t.parent if str(t.parent) else Path(".")
        temps.append(folder / f".{t.name}.{_host_tag()}-{os.getpid()}.{os.urandom(6).hex()}.tmp")
    renamed: list[Path] = []
    try:
        yield list(temps)
        order = list(range(len(targets)))
        if first_last:
            order = order[1:] + order[:1]
        for i in order:
            os.replace(temps[i], targets[i])
            renamed.append(targets[i])
    except BaseException:
        for p in temps + renamed:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
    for folder in {t.parent if str(t.parent) else Path(".") for t in targets}:
        _fsync_dir(folder)


def atomic_write_bytes(path: "str | os.PathLike[str]", data: bytes) -> None:
    """Atomically replace `path` with `data`."""
    with atomic_write(path) as f:
        f.write(data)


def atomic_write_text(path: "str | os.PathLike[str]", text: str, encoding: str = "utf-8") -> None:
    """Atomically replace `path` with `text` encoded as `encoding` (UTF-8 by default)."""
    atomic_write_bytes(path, text.encode(encoding))


__all__ = ["clean_stale_temps", "atomic_write", "atomic_publish_many", "atomic_write_bytes", "atomic_write_text"]
