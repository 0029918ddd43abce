"""Per-tensor weight error of a quantized GGUF against the baseline weights (in GGUF names and layout)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import CheckpointError
from quant.gguf_reader import read_gguf
from quant.gguf_to_hf import read_tensor_f32
from quant.loaders import open_checkpoint
from quant.model_plan import plan_model

_CHUNK = 1 << 20  # elements per step: bounded float64 temporaries for large tensors


@dataclass
class TensorError:
    """Error of one dequantized candidate tensor against the baseline tensor (see docs/METRICS.md)."""

    name: str
    qtype: str
    shape: list[int]
    n_elements: int
    bits_per_weight: float
    mse: float
    rel_rmse: float | None      # None when the baseline tensor is all zeros
    cosine: float | None        # None when either tensor is all zeros
    max_abs_error: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TensorError":
        return cls(**{**d, "shape": list(d["shape"])})


def tensor_error(ref: np.ndarray, cand: np.ndarray, *, name: str = "", qtype: str = "",
                 nbytes: int | None = None) -> TensorError:
    """MSE, relative RMSE, cosine similarity and max |error| of `cand` vs `ref`, summed in float64 in chunks."""
    r = np.asarray(ref, dtype=np.float32).reshape(-1)
    c = np.asarray(cand, dtype=np.float32).reshape(-1)
    if r.shape != c.shape:
        raise ValueError(f"{name}: baseline has {r.size} elements, candidate {c.size}")
    se = rr = cc = rc = 0.0
    mx = 0.0
    for s in range(0, r.size, _CHUNK):
        a, b = r[s:s + _CHUNK].astype(np.float64), c[s:s + _CHUNK].astype(np.float64)
        d = b - a
        se += float(d @ d)
        rr += float(a @ a)
        cc += float(b @ b)
        rc += float(a @ b)
        if d.size:
            mx = max(mx, float(np.abs(d).max()))
    n = r.size
    return TensorError(
        name=name,
        qtype=qtype,
        shape=list(np.shape(cand)),
        n_elements=n,
        bits_per_weight=(8.0 * nbytes / n) if (nbytes is not None and n) else math.nan,
        mse=se / n if n else 0.0,
        rel_rmse=math.sqrt(se / rr) if rr > 0 else None,
        cosine=rc / math.sqrt(rr * cc) if rr > 0 and cc > 0 else None,
        max_abs_error=mx,
    )


def per_tensor_errors(baseline: "str | os.PathLike[str]", candidate: "str | os.PathLike[str]",
                      on_tensor: Callable[[int, int, str], None] | None = None) -> list[TensorError]:
    """Error of every candidate GGUF tensor against the baseline (HF folder or float GGUF) brought into GGUF names
    and layout by quant.model_plan (Q/K permuted as the converter does), one tensor at a time."""

    out: list[TensorError] = []
    with open_checkpoint(Path(baseline)) as ckpt, read_gguf(Path(candidate)) as g:
        planned = {pt.name: pt for pt in plan_model(ckpt).tensors}
        for i, t in enumerate(g.tensors):
            if t.name not in planned:
                raise CheckpointError(f"candidate tensor {t.name!r} has no counterpart in the baseline {baseline}")
            pt = planned[t.name]
            if tuple(pt.shape) != tuple(t.shape):
                raise CheckpointError(f"tensor {t.name!r}: baseline shape {tuple(pt.shape)}, candidate {t.shape}")
            out.append(tensor_error(pt.read(), read_tensor_f32(g, t), name=t.name, qtype=t.qtype, nbytes=t.nbytes))
            if on_tensor is not None:
                on_tensor(i + 1, len(g.tensors), t.name)
    return out
