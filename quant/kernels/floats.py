"""F32, F16 and BF16 "quantization": the element conversions ggml_quantize_chunk applies, bit-exact.

F32 is a copy. F16 is ggml_fp32_to_fp16_row (ggml_compute_fp32_to_fp16, ported literally in common.py: IEEE
round-to-nearest-even, overflow to Inf, subnormals kept, every NaN -> sign | 0x7E00 where numpy would keep payload
bits; the literal port is also faster than numpy's cast plus a NaN fix-up). BF16 is ggml_fp32_to_bf16_row_ref
(ggml_compute_fp32_to_bf16: round-to-nearest-even on the top 16 bits, NaN -> (bits >> 16) | 0x40).
Dequantization is exact widening (as ggml and gguf.quants do).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.kernels.common import f32_as_i32, fp32_to_fp16_bits


def quantize_f32(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Copy float32 (rows, cols) into (rows, 4*cols) little-endian bytes (imatrix unused, as in ggml)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x.view(np.uint8).copy()


def dequantize_f32(raw: np.ndarray, cols: int) -> np.ndarray:
    """Read (rows, 4*cols) bytes back as float32 (rows, cols)."""
    return np.ascontiguousarray(raw, dtype=np.uint8).view(np.float32).reshape(-1, cols).copy()


@njit(parallel=True, cache=True, error_model="numpy")
def _f16_rows(x, out):
    for r in prange(x.shape[0]):
        for j in range(x.shape[1]):
            out[r, j] = fp32_to_fp16_bits(x[r, j])


def quantize_f16(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_fp32_to_fp16_row on every row: (rows, cols) float32 -> (rows, 2*cols) bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint16)
    _f16_rows(x, out)
    return out.view(np.uint8)


def dequantize_f16(raw: np.ndarray, cols: int) -> np.ndarray:
    """ggml_fp16_to_fp32_row: exact widening of (rows, 2*cols) half bytes."""
    return np.ascontiguousarray(raw, dtype=np.uint8).view(np.float16).reshape(-1, cols).astype(np.float32)


@njit(parallel=True, cache=True, error_model="numpy")
def _bf16_rows(u, out):
    for r in prange(u.shape[0]):
        for j in range(u.shape[1]):
            i = np.int64(u[r, j])
            if (i & 0x7FFFFFFF) > 0x7F800000:
                out[r, j] = (i >> 16) | 64
            else:
                out[r, j] = ((i + (0x7FFF + ((i >> 16) & 1))) >> 16) & 0xFFFF


def quantize_bf16(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_fp32_to_bf16_row_ref on every row: (rows, cols) float32 -> (rows, 2*cols) bytes."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint16)
    _bf16_rows(x.view(np.uint32), out)
    return out.view(np.uint8)


def dequantize_bf16(raw: np.ndarray, cols: int) -> np.ndarray:
    """GGML_BF16_TO_FP32: the bf16 bits become the top half of a float32."""
    h = np.ascontiguousarray(raw, dtype=np.uint8).view(np.uint16).reshape(-1, cols)
    return (h.astype(np.uint32) << np.uint32(16)).view(np.float32)


# ------------------------------------------------------------------ widening a stored F16/BF16 source to float32

_WIDEN_CHUNK = 1 << 16  # elements per parallel step


@njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
def _widen_f16(h, out):
    """IEEE half bits -> float32 bits, exact (as numpy's cast and GGML_FP16_TO_FP32 for every non-NaN; a NaN keeps
    its payload as numpy keeps it). Written branch-free (selects) so LLVM vectorizes it: ~5x numpy's cast."""
    n = h.shape[0]
    for c in prange((n + _WIDEN_CHUNK - 1) // _WIDEN_CHUNK):
        for i in range(c * _WIDEN_CHUNK, min(n, (c + 1) * _WIDEN_CHUNK)):
            w = np.uint32(h[i])
            sign = (w & np.uint32(0x8000)) << np.uint32(16)
            em = w & np.uint32(0x7FFF)
            bits = (em << np.uint32(13)) + np.uint32(0x38000000)          # rebias the exponent 15 -> 127
            bits = bits + np.uint32(0x38000000) if em >= np.uint32(0x7C00) else bits   # Inf/NaN: exponent 255
            sub = np.uint32(f32_as_i32(np.float32(np.int32(em)) * np.float32(5.960464477539063e-08)))  # m * 2^-24
            bits = sub if em < np.uint32(0x400) else bits                   # zero and subnormals: exact
            out[i] = bits | sign


@njit(parallel=True, cache=True, error_model="numpy", boundscheck=False)
def _widen_bf16(h, out):
    n = h.shape[0]
    for c in prange((n + _WIDEN_CHUNK - 1) // _WIDEN_CHUNK):
        for i in range(c * _WIDEN_CHUNK, min(n, (c + 1) * _WIDEN_CHUNK)):
            out[i] = np.uint32(h[i]) << np.uint32(16)


@njit(nogil=True, cache=True, error_model="numpy", boundscheck=False)
def _has_non_finite(u):
    """True if some float32 bit pattern in u has an all-ones exponent (NaN or Inf): an unsigned max of the
    exponent bits, branch-free so LLVM vectorizes it; serial and nogil, so callers split it across threads."""
    m = np.uint32(0)
    for i in range(u.shape[0]):
        e = u[i] & np.uint32(0x7F800000)
        m = max(m, e)
    return m == np.uint32(0x7F800000)


def all_finite_f32(x: np.ndarray) -> bool:
    """True if a contiguous float32 array holds no NaN/Inf: one vectorized pass, no temporary (numpy's isfinite
    allocates a bool per element); releases the GIL so chunks of one tensor can run on several threads."""
    return not _has_non_finite(x.reshape(-1).view(np.uint32))


def widen_to_f32(raw: np.ndarray, dtype: str, out: np.ndarray | None = None) -> np.ndarray:
    """Stored F16/BF16 bits (any uint8/uint16/float16 view, contiguous) -> float32, exactly, on the kernels'
    threads; into `out` (flat float32 of the same element count) when given."""
    h = np.ascontiguousarray(raw).reshape(-1).view(np.uint16)
    res = np.empty(h.size, np.float32) if out is None else out
    if res.dtype != np.float32 or res.size != h.size:
        raise ValueError(f"widen_to_f32: output of {res.size} {res.dtype} for {h.size} {dtype} values")
    (_widen_bf16 if dtype == "BF16" else _widen_f16)(h, res.reshape(-1).view(np.uint32))
    return res


KERNELS = {
    "F32": (quantize_f32, dequantize_f32),
    "F16": (quantize_f16, dequantize_f16),
    "BF16": (quantize_bf16, dequantize_bf16),
}
