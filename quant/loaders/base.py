"""What every checkpoint loader returns: lazily-read tensors plus the source's metadata and identity."""
from __future__ import annotations

import ctypes
import functools
import mmap
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Literal

import numpy as np

from quant.gguf_kv import KV

from core.errors import CheckpointError
from core.paths import file_kind
from core.regular_file import NotRegularFileError, open_regular_file

SourceKind = Literal["safetensors", "torch", "gguf"]


def check_regular(path: "str | os.PathLike[str]", what: str = "checkpoint") -> None:
    """Refuse a path that is not a regular file (FIFO, device, socket) without opening it: opening a FIFO blocks
    until a writer appears, reading /dev/zero never ends. Symlinks are followed (their target must be regular).
    Missing files raise FileNotFoundError (callers word that themselves)."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: {what} is not a regular file ({file_kind(st.st_mode)}); refused")


def open_regular(path: "str | os.PathLike[str]", what: str = "checkpoint") -> BinaryIO:
    """Open a regular file for binary reading, race-free (core.regular_file: a FIFO swapped in after a stat cannot
    block the open, the opened descriptor is what is checked); anything but a regular file raises CheckpointError."""
    try:
        return open_regular_file(path)
    except NotRegularFileError as e:
        raise CheckpointError(f"{path}: {what} is not a regular file ({e.kind}); refused") from None


def to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """Stored F32/F16/BF16 values (a flat array typed <f4, <f2 or <u2: BF16 as its bits) -> a new float32 array.
    F16/BF16 widen in one vectorized numba pass on the kernels' threads (quant.kernels.floats.widen_to_f32: ~5x
    numpy's float16 cast); F32 is copied. Exact: F16 and BF16 widen to float32 without rounding."""
    flat = raw.reshape(-1)
    if dtype in ("F16", "BF16"):
        from quant.kernels.floats import widen_to_f32  # lazy: numba loads with the kernels, at first use

        return widen_to_f32(flat, dtype)
    out = np.empty(flat.size, np.float32)
    out[:] = flat
    return out


def release_mapped(addr: int, nbytes: int) -> None:
    """madvise(MADV_DONTNEED) the whole pages inside [addr, addr + nbytes) of a read-only file mapping whose data
    has been copied out: they leave the resident set (a later access re-reads them from the page cache). Only for
    unmodified file-backed mappings (on anonymous memory it would zero the pages); no-op where madvise is missing."""
    libc = _libc()
    if libc is None or nbytes <= 0:
        return
    page = mmap.PAGESIZE
    start = -(-addr // page) * page          # inward: never a page outside the range
    stop = (addr + nbytes) // page * page
    if stop > start:
        libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(stop - start), mmap.MADV_DONTNEED)


@functools.cache
def _libc() -> "ctypes.CDLL | None":
    if not hasattr(mmap, "MADV_DONTNEED"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        return libc
    except (OSError, AttributeError):
        return None


@dataclass(frozen=True)
class SourceTensor:
    """One tensor of a checkpoint; `read()` loads only this tensor, as float32 of `shape`."""

    name: str                  # name in the source (HF name, state-dict key or GGUF name)
    shape: tuple[int, ...]     # numpy/torch order: the last axis is the contiguous row
    dtype: str                 # ggml type name of the stored data: F32/F16/BF16 or a quantized type (GGUF)
    reader: Callable[[], np.ndarray] = field(repr=False, compare=False)
    # loaders that can: the values into a float32 buffer the checkpoint reuses for the next read_scratch()
    scratch_reader: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)

    def read(self) -> np.ndarray:
        """Load this tensor as a float32 array of `shape` (dequantizing GGUF quantized data)."""
        arr = self.reader()
        if arr.dtype != np.float32:
            arr = arr.astype(np.float32)
        return arr.reshape(self.shape)

    def read_scratch(self) -> np.ndarray:
        """As read(), but the array may be a view of a buffer the checkpoint reuses: the next read_scratch() of any
        of its tensors overwrites it. For one consumer that is done with the values before it reads the next tensor
        (the quantize loop: no fresh float32 pages to fault in per tensor); read() where a loader has no buffer."""
        if self.scratch_reader is None:
            return self.read()
        return self.scratch_reader().reshape(self.shape)

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) if self.shape else 1


@dataclass
class Checkpoint:
    """An opened checkpoint: tensors in source order, HF config (if any) and GGUF metadata (if any)."""

    path: Path
    kind: SourceKind
    files: list[Path]                       # the files that make up the checkpoint (hashed for identity)
    tensors: list[SourceTensor]
    config: dict | None = None              # HF config.json, when the source is an HF folder
    gguf_kv: list[KV] = field(default_factory=list)  # GGUF sources: every KV except GGUF.* bookkeeping
    gguf_version: int | None = None
    closers: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def architecture(self) -> str | None:
        """`general.architecture` (GGUF) or the HF `model_type`, when known."""
        for kv in self.gguf_kv:
            if kv.key == "general.architecture":
                return str(kv.value)
        if self.config:
            return self.config.get("model_type")
        return None

    def tensor(self, name: str) -> SourceTensor:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
