"""MXFP4 (OCP microscaling FP4: E2M1 values with one E8M0 exponent per 32 weights): a literal numba port, bit-exact.

quantize = ggml_quantize_chunk -> quantize_mxfp4, which ignores quant_weights (an imatrix changes nothing) and runs
quantize_row_mxfp4_ref: e = amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0, d = GGML_E8M0_TO_FP32_HALF(e),
each weight -> the first of the 16 doubled E2M1 levels (kvalues_mxfp4) minimising |level*d - x|. log2f is libm's
own (numba calls the C library's log2f on float32, the function ggml calls), so floorf(log2f(.)) matches ggml also
just below powers of two where log2f rounds up; the float -> uint8_t cast is x86-64's (cvttss2si, low byte), which
matters for subnormal amax. Block layout (ggml-common.h): e (u8), qs[16].
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange

from quant.kernels.common import u32_as_f32

f32 = np.float32
QK_MXFP4 = 32
MXFP4_SIZE = 17  # e, qs[16]
KVALUES_MXFP4 = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.int8)
_KV = KVALUES_MXFP4.astype(np.float32)  # C promotes the int8 levels to float in kvalues_mxfp4[i]*e (exact)


@njit(cache=True, error_model="numpy")
def e8m0_to_fp32_half(e):
    """ggml_e8m0_to_fp32_half: 2^(e-128) as float32 (denormal bit patterns for e < 2)."""
    e = np.int64(e)
    if e < 2:
        return u32_as_f32(np.int64(0x00200000) << e)
    return u32_as_f32((e - 1) << 23)


@njit(cache=True, error_model="numpy")
def shared_exponent(amax):
    """e = amax > 0 ? (uint8_t)(floorf(log2f(amax)) - 2 + 127) : 0, the cast as x86-64 compiles it."""
    if amax > f32(0.0):
        v = np.floor(math.log2(amax)) - f32(2.0) + f32(127.0)  # float32 throughout: log2f, floorf
        return np.int64(int(v)) & 0xFF
    return np.int64(0)


@njit(cache=True, error_model="numpy")
def best_index_mxfp4(val, x, e):
    """ggml's best_index_mxfp4 literally: the first index i minimising fabsf(kvalues_mxfp4[i]*e - x)."""
    best_index = 0
    best_err = abs(val[0] * e - x)
    for i in range(1, 16):
        err = abs(val[i] * e - x)
        if err < best_err:
            best_index = i
            best_err = err
    return best_index


@njit(cache=True, error_model="numpy")
def _best_index_fast(kd, x):
    """best_index_mxfp4 with kd[i] = kvalues_mxfp4[i]*e (i < 8) precomputed per block, searching 8 levels, same
    result: for x >= 0 (+-0 included) every negative level's error fl(k*e + x) is >= index 0's |x|, so the first
    minimum is among indices 0..7; for x < 0 the positive levels lose to index 0 likewise, and index 8+i's error
    fabsf(-(k*e) - x) equals fabsf(k*e - |x|) bit for bit (negation is exact), so it is 8 + the search on |x|."""
    ax = abs(x)
    best_index = 0
    best_err = abs(kd[0] - ax)
    for i in range(1, 8):
        err = abs(kd[i] - ax)
        if err < best_err:
            best_index = i
            best_err = err
    if x < f32(0.0) and best_index > 0:
        best_index += 8
    return best_index


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_mxfp4(x, out, val):
    for r in prange(x.shape[0]):
        xr, y = x[r], out[r]
        kd = np.empty(8, np.float32)
        for i in range(xr.shape[0] // QK_MXFP4):
            xb = xr[QK_MXFP4 * i:QK_MXFP4 * (i + 1)]
            o = MXFP4_SIZE * i
            amax = f32(0.0)
            for j in range(QK_MXFP4):
                if amax < abs(xb[j]):
                    amax = abs(xb[j])
            e = shared_exponent(amax)
            d = e8m0_to_fp32_half(e)
            y[o] = e
            for k in range(8):
                kd[k] = val[k] * d
            for j in range(QK_MXFP4 // 2):
                x0 = _best_index_fast(kd, xb[j])
                x1 = _best_index_fast(kd, xb[QK_MXFP4 // 2 + j])
                y[o + 1 + j] = x0 | (x1 << 4)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_mxfp4(raw, y, val):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for i in range(out.shape[0] // QK_MXFP4):
            o = MXFP4_SIZE * i
            d = e8m0_to_fp32_half(b[o])
            for j in range(QK_MXFP4 // 2):
                q = np.int64(b[o + 1 + j])
                out[QK_MXFP4 * i + j] = val[q & 0x0F] * d
                out[QK_MXFP4 * i + j + QK_MXFP4 // 2] = val[q >> 4] * d


def quantize_mxfp4(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """ggml_quantize_chunk(GGML_TYPE_MXFP4) on a (rows, cols) float32 matrix (the imatrix is unused, as in ggml)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.empty((rows, cols // QK_MXFP4 * MXFP4_SIZE), dtype=np.uint8)
    _quantize_mxfp4(x, out, _KV)
    return out


def dequantize_mxfp4(raw: np.ndarray, cols: int) -> np.ndarray:
    """dequantize_row_mxfp4 for every row of raw (rows, row_bytes)."""
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    y = np.empty((raw.shape[0], cols), dtype=np.float32)
    _dequantize_mxfp4(raw, y, _KV)
    return y


KERNELS = {"MXFP4": (quantize_mxfp4, dequantize_mxfp4)}
