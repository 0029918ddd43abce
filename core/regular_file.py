"""Open or read a file only when it is a regular file, race-free: one idiom for every reader of user paths.

A FIFO blocks `open()` until a writer appears, `/dev/zero` never ends and a device may be swapped in after a
`stat()`: so the path is opened with O_NONBLOCK (the open cannot block), the opened descriptor is checked with
`fstat` (what is read is what was checked), and only then is it switched back to blocking reads. Callers turn
`NotRegularFileError` / `FileTooLargeError` into their own area's error with their own wording.
"""
from __future__ import annotations

import os
import stat
from typing import BinaryIO

from core.paths import file_kind


class NotRegularFileError(OSError):
    """The path names a FIFO, device, socket or folder (`kind` says which, in words); nothing was read."""

    def __init__(self, path: "str | os.PathLike[str]", kind: str) -> None:
        super().__init__(f"{os.fspath(path)}: not a regular file ({kind})")
        self.path = os.fspath(path)
        self.kind = kind


class FileTooLargeError(OSError):
    """A regular file larger than the caller allows (`size` > `limit`; size is -1 when it grew while being read)."""

    def __init__(self, path: "str | os.PathLike[str]", size: int, limit: int) -> None:
        super().__init__(f"{os.fspath(path)}: {size} bytes, more than the {limit} allowed")
        self.path = os.fspath(path)
        self.size = size
        self.limit = limit


def open_regular_file(path: "str | os.PathLike[str]") -> BinaryIO:
    """Open `path` for binary reading if it is a regular file (symlinks followed); else NotRegularFileError.
    OSError from the open itself (missing, EACCES, ...) propagates unchanged."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFileError(path, file_kind(mode))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: "str | os.PathLike[str]", max_bytes: int) -> bytes:
    """The whole content of a regular file of at most `max_bytes` bytes (never more is read, even when the file
    grows while being read): NotRegularFileError, FileTooLargeError, or the open's own OSError."""
    with open_regular_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        if size > max_bytes:
            raise FileTooLargeError(path, size, max_bytes)
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise FileTooLargeError(path, -1, max_bytes)
    return data
