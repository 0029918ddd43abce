"""Open an existing GGUF file as a quantization source (F32/F16/BF16, or quantized with allow_requantize)."""
from __future__ import annotations

import functools
import logging
import os
import threading
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import CheckpointError, GGUFFormatError
from quant.api import dequantize
from quant.formats import QTYPES
from quant.gguf_reader import ALIGNMENT_KEY, GGUFFile, TensorInfo
from quant.gguf_split import SPLIT_KEYS, open_gguf_parts
from quant.loaders.base import Checkpoint, SourceTensor, open_regular

logger = logging.getLogger(__name__)
FLOAT_TYPES = ("F32", "F16", "BF16")


class _FloatFile:
    """A GGUF's float tensors read with pread() into one reused staging buffer (as llama.cpp's loader read()s them):
    no page faults of a mapping, no per-tensor allocation of the stored bytes; F16/BF16 widen from it into a float32
    array (F32 is read straight into it): a new one for read(), the reused `scratch` one for read_scratch(). Both
    buffers grow to the largest tensor and stay (peak memory is that tensor's, as before); one lock guards them."""

    def __init__(self, g: GGUFFile) -> None:
        f = open_regular(g.path, "GGUF file")
        try:
            st = os.fstat(f.fileno())
            if st.st_size != g.file_size:
                raise CheckpointError(f"{g.path}: file changed while it was opened ({st.st_size} bytes, parsed "
                                      f"{g.file_size})")
        except BaseException:
            f.close()
            raise
        self.path, self.file, self.size = g.path, f, g.file_size
        self.lock = threading.Lock()
        self.staging = np.empty(0, np.uint8)  # grows to the largest F16/BF16 tensor (bounded by the file's size)
        self.scratch = np.empty(0, np.float32)  # read_scratch's float32 buffer: grows to the largest float tensor

    def _pread(self, mv: memoryview, offset: int, name: str) -> None:
        fd, done = self.file.fileno(), 0
        while done < len(mv):
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{self.path}: tensor {name!r}: file ended at offset {offset + done} "
                                      "(truncated while being read)")
            done += n

    def read(self, t: TensorInfo, scratch: bool = False) -> np.ndarray:
        """Tensor `t` as flat float32: a new array, or (scratch) a view of the reused float32 buffer."""
        if t.offset + t.nbytes > self.size:  # checked by the parser too; never a read sized beyond the file
            raise CheckpointError(f"{self.path}: data of tensor {t.name!r} lies beyond the end of the file")
        n = t.nbytes // (4 if t.qtype == "F32" else 2)
        with self.lock:
            out = self._scratch(n) if scratch else np.empty(n, np.float32)
            if t.qtype == "F32":
                self._pread(memoryview(out).cast("B"), t.offset, t.name)
                return out
            if self.staging.size < t.nbytes:
                self.staging = np.empty(0, np.uint8)  # free the old one first: peak is one staging buffer
                self.staging = np.empty(t.nbytes, np.uint8)
            raw = self.staging[:t.nbytes]
            self._pread(memoryview(raw), t.offset, t.name)
            from quant.kernels.floats import widen_to_f32  # lazy: numba loads with the kernels, at first use

            return widen_to_f32(raw, t.qtype, out=out)

    def _scratch(self, n: int) -> np.ndarray:
        if self.scratch.size < n:
            self.scratch = np.empty(0, np.float32)
            self.scratch = np.empty(n, np.float32)
        return self.scratch[:n]

    def close(self) -> None:
        self.file.close()
        self.staging, self.scratch = np.empty(0, np.uint8), np.empty(0, np.float32)


def _dequant_reader(g: GGUFFile, t: TensorInfo) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        out = dequantize(g.tensor_data(t), t.qtype, t.shape or (1,))
        g.release(t)
        return out

    return read


def _is_bookkeeping(key: str) -> bool:
    return key.startswith("GGUF.") or key == ALIGNMENT_KEY or key in SPLIT_KEYS  # (llama-quantize drops split.*)


def open_gguf_checkpoint(path: "str | os.PathLike[str]", *, allow_requantize: bool = False) -> Checkpoint:
    """Open a GGUF v2/v3 (one file, or any part of a llama.cpp split GGUF: all parts are read) as a Checkpoint;
    quantized tensors need allow_requantize=True.

    Requantizing an already-quantized model compounds the errors of both quantizations, which is
    why llama.cpp refuses it without --allow-requantize; quantgate follows the same rule.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{p}: no such GGUF file")
    try:
        parts = open_gguf_parts(p)  # one file, or every part of a split GGUF (checked as llama.cpp's loader does)
    except GGUFFormatError as e:
        raise CheckpointError(str(e)) from e
    float_files: dict[int, _FloatFile] = {}
    try:
        tensors: list[SourceTensor] = []
        requantized: list[str] = []
        for g, t in ((g, t) for g in parts for t in g.tensors):
            if t.qtype in FLOAT_TYPES:
                if id(g) not in float_files:
                    float_files[id(g)] = _FloatFile(g)
                ff = float_files[id(g)]
                tensors.append(SourceTensor(t.name, t.shape, t.qtype, functools.partial(ff.read, t),
                                            functools.partial(ff.read, t, True)))
                continue
            elif t.qtype in QTYPES:
                if not allow_requantize:
                    raise CheckpointError(
                        f"{p}: tensor {t.name!r} is already quantized ({t.qtype}); requantizing from type "
                        f"{t.qtype} is disabled. Pass allow_requantize=True (--allow-requantize) to do it anyway"
                    )
                requantized.append(t.name)
                reader = _dequant_reader(g, t)
            else:
                raise CheckpointError(
                    f"{p}: tensor {t.name!r} has type {t.qtype}, which quantgate cannot read "
                    f"(readable: {', '.join(QTYPES)})"
                )
            tensors.append(SourceTensor(t.name, t.shape, t.qtype, reader))
    except BaseException:
        for ff in float_files.values():
            ff.close()
        for g in parts:
            g.close()
        raise
    if requantized:
        msg = (
            f"{p}: requantizing {len(requantized)} already-quantized tensors (e.g. {requantized[0]!r}); "
            "quality will be worse than quantizing from the original F32/F16/BF16 weights"
        )
        warnings.warn(msg, stacklevel=2)
        logger.warning(msg)
    return Checkpoint(
        path=p,
        kind="gguf",
        files=[g.path for g in parts],
        tensors=tensors,
        gguf_kv=[kv for kv in parts[0].kv if not _is_bookkeeping(kv.key)],
        gguf_version=parts[0].version,
        closers=[g.close for g in parts] + [ff.close for ff in float_files.values()],
    )


__all__ = ["open_gguf_checkpoint"]
