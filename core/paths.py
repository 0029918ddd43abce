"""Where an output may go: a regular file (or nothing yet), never one of the inputs, never inside a source folder.

`quantize --out /dev/null` once turned a character device into a regular file, `--out` equal to `--model` replaced
the checkpoint being read, and an output inside the source checkpoint folder changed that checkpoint's identity.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterable

from core.errors import QuantGateError


class OutputTargetError(QuantGateError, ValueError):
    """An output path that would destroy or alter something it must not (a device, an input, a source folder)."""


def file_kind(mode: int) -> str:
    """What a stat mode that is not a regular file is, in words (for "not a regular file" errors)."""
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a file"


def check_output_target(out: "str | os.PathLike[str]", sources: Iterable["str | os.PathLike[str]"]) -> Path:
    """Return `out` when writing it is safe; raise OutputTargetError when it exists and is not a regular file, is one
    of `sources` (files or folders, symlinks resolved), or lies inside a source folder."""
    target = Path(out)
    try:
        st = os.stat(target)  # follows symlinks: what a rename would replace is the link, what a reader sees is this
    except FileNotFoundError:
        st = None   # other OSErrors (ENAMETOOLONG, EACCES...) reach the CLI's one-line errno report as they are
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a device, FIFO or socket)"
        raise OutputTargetError(f"{target}: output exists and is {kind}; refused")
    if target.is_symlink():
        raise OutputTargetError(f"{target}: output is a symlink; write to a plain path")
    resolved = target.resolve()
    for src in sources:
        s = Path(src).resolve()
        if resolved == s:
            raise OutputTargetError(f"{target}: output is an input ({src}); choose another --out")
        if s.is_dir() and resolved.is_relative_to(s):
            raise OutputTargetError(f"{target}: output is inside the source folder {src}; choose another --out")
    return target
