"""Public quantization API: `quantize` and `dequantize` over ggml block formats, bit-exact with ggml."""
from __future__ import annotations

import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator

import numpy as np

from core.errors import NonFiniteError, ShapeError
from quant.formats import get_qtype
from quant.imatrix_policy import check_kernel_imatrix


@functools.cache
def _kernels():
    from quant.kernels import load_kernels  # lazy: avoids an import cycle

    return load_kernels()


def _as_matrix(x: np.ndarray, name: str | None) -> np.ndarray:
    x = np.asarray(x)
    label = f"tensor {name!r}" if name else "input"
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if x.ndim != 2:
        raise ShapeError(f"{label}: expected a 2-D (rows, cols) array, got shape {x.shape}")
    if x.dtype != np.float32:
        if not np.issubdtype(x.dtype, np.floating):
            raise ShapeError(f"{label}: expected float32 weights, got {x.dtype}")
        x = x.astype(np.float32)
    return np.ascontiguousarray(x)


_FINITE_CHUNK = 1 << 20  # elements per np.isfinite step: a cache-sized bool temporary, not one the tensor's size


def _all_finite(x: np.ndarray) -> bool:
    if x.dtype == np.float32 and x.flags.c_contiguous:
        from quant.kernels.floats import all_finite_f32  # lazy, as _kernels(): avoids an import cycle

        flat32 = x.reshape(-1)
        step = _FINITE_CHUNK * 4
        starts32 = range(0, flat32.size, step)
        return all(chunk_map(lambda s: all_finite_f32(flat32[s:s + step]), starts32))
    flat = x.reshape(-1)
    if flat.size <= _FINITE_CHUNK:
        return bool(np.isfinite(flat).all())
    starts = range(0, flat.size, _FINITE_CHUNK)
    return all(chunk_map(lambda s: bool(np.isfinite(flat[s:s + _FINITE_CHUNK]).all()), starts))


def chunk_map(fn, items) -> list:
    """Run fn over items on the kernels' thread count (get_threads()); for numpy work that releases the GIL
    (casts, ufuncs), so conversions and checks outside the numba kernels use the cores the kernels do."""
    items = list(items)
    n = min(get_threads(), len(items))
    if n <= 1:
        return [fn(i) for i in items]
    return list(_pool().map(fn, items))


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="quant")


def check_finite(x: np.ndarray, name: str | None = None) -> None:
    """Raise NonFiniteError naming the tensor and the first bad position if x holds NaN or Inf."""
    if x.size and not _all_finite(x):
        bad = np.argwhere(~np.isfinite(x))[0]
        n_nan = int(np.isnan(x).sum())
        n_inf = int(np.isinf(x).sum())
        label = f"tensor {name!r}" if name else "input"
        raise NonFiniteError(
            f"{label} contains {n_nan} NaN and {n_inf} Inf values (first at index {tuple(int(i) for i in bad)}); "
            "refusing to quantize"
        )


def quantize(
    x: np.ndarray, qtype: str, *, imatrix: np.ndarray | None = None, name: str | None = None
) -> np.ndarray:
    """Quantize a float32 (rows, cols) matrix to ggml `qtype`; returns uint8 (rows, bytes_per_row) block bytes.

    `imatrix` is the per-column importance (as llama-imatrix produces), used exactly where ggml uses it; IQ2_XXS,
    IQ2_XS and IQ1_S refuse to run without one (ImatrixRequiredError), as ggml does. `name` only labels errors.
    """
    qt = get_qtype(qtype)
    m = _as_matrix(x, name)
    rows, cols = m.shape
    qt.row_bytes(cols)  # validates the block multiple
    check_finite(m, name)
    check_kernel_imatrix(qt.name, imatrix, name)
    w = None
    if imatrix is not None:
        w = np.ascontiguousarray(np.asarray(imatrix, dtype=np.float32).reshape(-1))
        if w.shape[0] != cols:
            raise ShapeError(
                f"imatrix for {name or 'input'} has {w.shape[0]} entries, expected one per column ({cols})"
            )
        check_finite(w, f"imatrix of {name}" if name else "imatrix")
    q, _ = _kernels()[qt.name]
    out = q(m, w)
    assert out.shape == (rows, qt.row_bytes(cols)) and out.dtype == np.uint8
    return out


def quantize_tensor(
    x: np.ndarray, qtype: str, *, imatrix: np.ndarray | None = None, name: str | None = None
) -> np.ndarray:
    """Quantize a tensor of any rank row-wise (last axis = row) to flat block bytes, as llama-quantize does.

    A 3-D tensor (stacked MoE experts, (n_expert, rows, cols)) is quantized one 2-D slice at a time; `imatrix`
    then holds n_expert * cols values, one column vector per expert, as llama-imatrix collects them (a single
    cols-long vector is refused by llama.cpp for such tensors, and here too)."""
    x = np.asarray(x)
    if x.ndim <= 2 or imatrix is None:
        m = x.reshape(-1, x.shape[-1]) if x.ndim > 1 else x.reshape(1, -1)
        return quantize(m, qtype, imatrix=imatrix, name=name).reshape(-1)
    cols, n_mat = x.shape[-1], int(np.prod(x.shape[:-2], dtype=np.int64))
    w = np.asarray(imatrix, dtype=np.float32).reshape(-1)
    if w.shape[0] != n_mat * cols:
        raise ShapeError(f"imatrix for {name or 'input'} has {w.shape[0]} entries, expected {n_mat} x {cols} "
                         f"(one per column of each of its {n_mat} matrices)")
    mats = x.reshape(n_mat, -1, cols)
    return np.concatenate([quantize(mats[i], qtype, imatrix=w[i * cols:(i + 1) * cols], name=name).reshape(-1)
                           for i in range(n_mat)])


def dequantize(raw: np.ndarray, qtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Decode ggml block bytes of `qtype` back to float32 with the numpy-order `shape` (last axis = row)."""
    qt = get_qtype(qtype)
    shape = tuple(int(d) for d in shape)
    if not shape:
        raise ShapeError("dequantize needs a non-empty shape")
    cols = shape[-1]
    rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    row_bytes = qt.row_bytes(cols)
    buf = np.ascontiguousarray(np.asarray(raw).view(np.uint8)).reshape(-1)
    if buf.size != rows * row_bytes:
        raise ShapeError(
            f"{qt.name} data of {buf.size} bytes does not match shape {shape} ({rows * row_bytes} bytes expected)"
        )
    _, dq = _kernels()[qt.name]
    return dq(buf.reshape(rows, row_bytes), cols).reshape(shape)


def get_threads() -> int:
    """Threads the kernels use (numba's thread count)."""
    import numba

    return int(numba.get_num_threads())


@contextlib.contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run the kernels inside the block on `n` threads (None or 0: all cores)."""
    import numba

    old = numba.get_num_threads()
    want = n or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(max(1, min(int(want), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield numba.get_num_threads()
    finally:
        numba.set_num_threads(old)


__all__ = ["quantize", "dequantize", "threads", "get_threads", "check_finite", "chunk_map"]
