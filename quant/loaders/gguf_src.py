"""Open an existing GGUF file as a quantization source (F32/F16/BF16, or quantized with allow_requantize)."""
from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import CheckpointError, GGUFFormatError
from quant.api import dequantize
from quant.formats import QTYPES
from quant.gguf_reader import ALIGNMENT_KEY, GGUFFile, TensorInfo
from quant.gguf_split import SPLIT_KEYS, open_gguf_parts
from quant.loaders.base import Checkpoint, SourceTensor, to_float32

logger = logging.getLogger(__name__)
FLOAT_TYPES = ("F32", "F16", "BF16")


def _float_reader(g: GGUFFile, t: TensorInfo) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        raw = g.tensor_data(t)
        out = to_float32(raw.view({"F32": "<f4", "F16": "<f2"}.get(t.qtype, "<u2")), t.qtype)  # a copy: the
        del raw                                                                              # mapping may close
        g.release(t)  # copied out: its mapped pages need not stay resident
        return out

    return read


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
    try:
        tensors: list[SourceTensor] = []
        requantized: list[str] = []
        for g, t in ((g, t) for g in parts for t in g.tensors):
            if t.qtype in FLOAT_TYPES:
                reader = _float_reader(g, t)
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
        closers=[g.close for g in parts],
    )


__all__ = ["open_gguf_checkpoint"]
