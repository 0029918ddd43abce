"""Per-tensor weight error of a quantized GGUF against the baseline weights (in GGUF names and layout)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from core.errors import CheckpointError
from quant.gguf_split import open_gguf
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


def _ggml_dims(shape) -> tuple[int, ...]:
    """A numpy-order shape without its leading 1s (ggml_n_dims drops those trailing ggml dimensions)."""
    dims = tuple(int(d) for d in shape)
    while len(dims) > 1 and dims[0] == 1:
        dims = dims[1:]
    return dims


def per_tensor_errors(baseline: "str | os.PathLike[str]", candidate: "str | os.PathLike[str]",
                      on_tensor: Callable[[int, int, str], None] | None = None) -> list[TensorError]:
    """Error of every candidate GGUF tensor against the baseline (HF folder or float GGUF) brought into GGUF names
    and layout by quant.model_plan (Q/K permuted as the converter does), one tensor at a time."""

    out: list[TensorError] = []
    with open_checkpoint(Path(baseline)) as ckpt, open_gguf(Path(candidate)) as g:
        planned = {pt.name: pt for pt in plan_model(ckpt).tensors}
        for i, t in enumerate(g.tensors):
            if t.name not in planned:
                raise CheckpointError(f"candidate tensor {t.name!r} has no counterpart in the baseline {baseline}")
            pt = planned[t.name]
            if _ggml_dims(pt.shape) != _ggml_dims(t.shape):  # (1, n) is written 1-D by llama-quantize
                raise CheckpointError(f"tensor {t.name!r}: baseline shape {tuple(pt.shape)}, candidate {t.shape}")
            out.append(tensor_error(pt.read().reshape(t.shape), read_tensor_f32(g, t), name=t.name, qtype=t.qtype,
                                    nbytes=t.nbytes))
            if on_tensor is not None:
                on_tensor(i + 1, len(g.tensors), t.name)
    return out


#: The largest relative RMSE a tensor of each candidate type may have against the baseline tensor it was quantized
#: from, for structural:derived_from's weights check (docs/LINEAGE.md: about 2-4x the worst per-tensor error
#: measured on models/reference and a tiny Qwen2, without an importance matrix). Weights of another model sit near
#: sqrt(2) (independent weights of the same scale) or above 1: far outside every bound.
LINEAGE_REL_RMSE: dict[str, float] = {
    "F32": 0.01, "F16": 0.01, "BF16": 0.01,
    "Q8_0": 0.02, "Q6_K": 0.05, "Q5_K": 0.08, "Q5_1": 0.08, "Q5_0": 0.10,
    "Q4_K": 0.15, "Q4_1": 0.16, "Q4_0": 0.20, "Q3_K": 0.35, "Q2_K": 0.60,
    "IQ4_NL": 0.16, "IQ4_XS": 0.16, "MXFP4": 0.25,
    # ternary types on non-ternary weights sit near 0.82; another model's weights near 1.47: 1.0 separates them
    "TQ1_0": 1.0, "TQ2_0": 1.0,
    # i-quants: about twice their relative RMSE on Gaussian weights with an imatrix (docs/DECISIONS.md)
    "IQ3_S": 0.40, "IQ3_XXS": 0.45, "IQ2_S": 0.65, "IQ2_XS": 0.80, "IQ2_XXS": 0.90, "IQ1_M": 0.95, "IQ1_S": 0.95,
}


@dataclass
class LineageCheck:
    """Outcome of checking a candidate's weights against a baseline: `problem` names the first tensor that cannot
    come from the baseline (None when every tensor is within its type's bound)."""

    n_checked: int
    n_tensors: int
    problem: str | None
    worst: TensorError | None   # the tensor closest to its bound (relative to the bound), when any was checked


def weights_lineage(baseline: "str | os.PathLike[str]", candidate: "str | os.PathLike[str]") -> LineageCheck:
    """Check that every candidate tensor could be a quantization of the baseline's tensor of the same GGUF name:
    present in the baseline (in GGUF names and layout, quant.model_plan), same shape, and relative RMSE within
    LINEAGE_REL_RMSE of its type. Stops at the first tensor that fails (one tensor in memory at a time)."""
    worst: TensorError | None = None
    worst_ratio = -1.0
    n = 0
    with open_checkpoint(Path(baseline), allow_requantize=True) as ckpt, open_gguf(Path(candidate)) as g:
        try:
            planned = {pt.name: pt for pt in plan_model(ckpt).tensors}
        except CheckpointError as e:
            return LineageCheck(0, len(g.tensors), f"the baseline cannot be laid out as a GGUF: {e}", None)
        for t in g.tensors:  # names, shapes and types first: no value is read for a file of another layout
            pt = planned.get(t.name)
            if pt is None:
                return LineageCheck(0, len(g.tensors), f"tensor {t.name} is not in the baseline", None)
            if tuple(pt.shape) != tuple(t.shape):
                return LineageCheck(0, len(g.tensors), f"tensor {t.name} has shape {tuple(t.shape)}, the "
                                    f"baseline's {tuple(pt.shape)}", None)
            if t.qtype not in LINEAGE_REL_RMSE:
                return LineageCheck(0, len(g.tensors), f"tensor {t.name} is {t.qtype}, a type quantgate cannot "
                                    "dequantize: its lineage cannot be checked", None)
        for t in g.tensors:
            bound = LINEAGE_REL_RMSE[t.qtype]
            err = tensor_error(planned[t.name].read(), read_tensor_f32(g, t), name=t.name, qtype=t.qtype,
                               nbytes=t.nbytes)
            n += 1
            rel = err.rel_rmse if err.rel_rmse is not None else (0.0 if err.mse == 0.0 else math.inf)
            if rel / bound > worst_ratio:
                worst, worst_ratio = err, rel / bound
            if not rel <= bound:
                return LineageCheck(n, len(g.tensors), f"tensor {t.name} ({t.qtype}) differs from the baseline's: "
                                    f"relative RMSE {rel:.4g} > {bound:g} allowed for {t.qtype}", worst)
    return LineageCheck(n, n, None, worst)
