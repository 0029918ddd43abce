"""IQ4_NL and IQ4_XS (4-bit non-linear: 16 fixed levels kvalues_iq4nl): literal numba ports of ggml-quants.c.

quantize = ggml_quantize_chunk -> quantize_iq4_nl / quantize_iq4_xs, both quantize_row_iq4_nl_impl with ntry = 7:
per 32-weight block a scale search over 15 trial scales (best_index_int8 picks each weight's level), weighted by
qw[j] * sqrtf(sigma2 + x[j]^2) with an imatrix and by x[j]^2 without one (quant_weights NULL). IQ4_NL stores each
block's fp16 scale; IQ4_XS (super-block 256) stores one fp16 d = -max_scale/32 and a 6-bit level per block, then
re-picks every weight's level against d * level (computed from the unrounded float d, as ggml does).
Float32 everywhere C uses float, C's operation order, no fastmath. dequantize ports dequantize_row_iq4_nl/_xs.
Block layouts (ggml-common.h, little-endian): iq4_nl = d, qs[16]; iq4_xs = d, scales_h (u16), scales_l[4], qs[128].
"""
# ruff: noqa: PLR1730  -- C's `if (a > b) b = a` kept literally: min()/max() differ on NaN/-0.0
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.kernels.common import get_fp16, nearest_int, put_fp16, to_u8
from quant.kernels.search import GROUP_MAX_EPS

f32 = np.float32
QK4_NL = 32
QK_K = 256
IQ4_NL_SIZE = 18  # d, qs[16]
IQ4_XS_SIZE = 136  # d, scales_h, scales_l[4], qs[128]
NTRY = 7  # quantize_iq4_nl / quantize_iq4_xs always pass ntry = 7
KVALUES_IQ4NL = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_KV = KVALUES_IQ4NL.astype(np.float32)  # the int8 levels as C promotes them in float expressions (exact)
_NO_IMATRIX = np.zeros(0, dtype=np.float32)


@njit(cache=True, error_model="numpy")
def best_index_int8(val, x):
    """ggml's best_index_int8(16, val, x): the nearest of the 16 sorted levels, ties upward. ggml binary-searches
    for the last level <= x; counting the levels <= x gives the same index without data-dependent branches (~25%
    less time for the IQ4 scale search), and the final comparison is C's expression. A NaN (which the search
    cannot meet: the scales are finite and the weights checked) would end at 15 there and here."""
    if x <= val[0]:
        return 0
    if x >= val[15] or x != x:
        return 15
    ml = 0
    for k in range(1, 15):
        ml += 1 if val[k] <= x else 0
    return ml if x - val[ml] < val[ml + 1] - x else ml + 1


@njit(cache=True, error_model="numpy")
def _block_scale(xb, weight, Lb, val):
    """One 32-weight block of quantize_row_iq4_nl_impl's first loop (ntry = 7): the best scale d (Lb filled)."""
    amax = f32(0.0)
    mx = f32(0.0)
    for j in range(32):
        ax = abs(xb[j])
        if ax > amax:
            amax = ax
            mx = xb[j]
    if amax < GROUP_MAX_EPS:
        return f32(0.0)
    d = -mx / val[0]
    id_ = f32(1.0) / d
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for j in range(32):
        al = id_ * xb[j]
        l = best_index_int8(val, al)
        Lb[j] = l
        q = val[l]
        w = weight[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    d = sumqx / sumq2 if sumq2 > f32(0.0) else f32(0.0)
    best = d * sumqx
    for itry in range(-NTRY, NTRY + 1):
        id_ = (f32(itry) + val[0]) / mx  # C: (itry + values[0])/max, exact small ints
        sumqx = f32(0.0)
        sumq2 = f32(0.0)
        for j in range(32):
            al = id_ * xb[j]
            l = best_index_int8(val, al)
            q = val[l]
            w = weight[j]
            sumqx += w * q * xb[j]
            sumq2 += w * q * q
        if sumq2 > f32(0.0) and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True, error_model="numpy")
def _weights(xb, qw, sigma2, weight):
    """qw[j] * sqrtf(sigma2 + x^2) with an imatrix, x^2 without (quant_weights NULL)."""
    if qw.shape[0] > 0:
        for j in range(32):
            weight[j] = qw[j] * np.sqrt(sigma2 + xb[j] * xb[j])
    else:
        for j in range(32):
            weight[j] = xb[j] * xb[j]


@njit(cache=True, error_model="numpy")
def _sigma2(x, n):
    s = f32(0.0)
    for j in range(n):
        s += x[j] * x[j]
    return s * (f32(2.0) / f32(n))


@njit(cache=True, error_model="numpy")
def _pack_q4(L, q4, n):
    for i in range(n // 32):
        for j in range(16):
            q4[16 * i + j] = to_u8(np.int64(L[32 * i + j]) | (np.int64(L[32 * i + 16 + j]) << 4))


@njit(cache=True, error_model="numpy")
def _iq4_nl_block(x, y, qw, L, weight, val):
    """quantize_row_iq4_nl_impl(QK4_NL, 32, ..., ntry = 7) on one block: y = d, qs[16]."""
    sigma2 = _sigma2(x, QK4_NL)
    _weights(x, qw, sigma2, weight)
    scale = _block_scale(x, weight, L, val)
    put_fp16(y, 0, scale)
    id_ = f32(1.0) / scale if scale != f32(0.0) else f32(0.0)
    for j in range(QK4_NL):
        L[j] = best_index_int8(val, id_ * x[j])
    _pack_q4(L, y[2:18], QK4_NL)


@njit(cache=True, error_model="numpy")
def _iq4_xs_block(x, y, qw, L, weight, scales, val):
    """quantize_row_iq4_nl_impl(QK_K, 32, ..., ntry = 7) on one super-block: y = d, scales_h, scales_l, qs."""
    sigma2 = _sigma2(x, QK_K)
    max_scale = f32(0.0)
    amax_scale = f32(0.0)
    for ib in range(QK_K // 32):
        xb = x[32 * ib:32 * ib + 32]
        _weights(xb, qw[32 * ib:32 * ib + 32], sigma2, weight)  # empty stays empty: C's NULL
        d = _block_scale(xb, weight, L[32 * ib:32 * ib + 32], val)
        scales[ib] = d
        abs_d = abs(d)
        if abs_d > amax_scale:
            amax_scale = abs_d
            max_scale = d
    d = -max_scale / f32(32.0)
    put_fp16(y, 0, d)
    id_ = f32(1.0) / d if d != f32(0.0) else f32(0.0)
    scales_h = 0
    for ib in range(QK_K // 32):
        l = nearest_int(id_ * scales[ib])
        l = max(-32, min(31, l))
        dl = d * f32(l)
        idl = f32(1.0) / dl if dl != f32(0.0) else f32(0.0)
        for j in range(32):
            L[32 * ib + j] = best_index_int8(val, idl * x[32 * ib + j])
        l += 32
        l_l = l & 0xF
        l_h = l >> 4
        if ib % 2 == 0:
            y[4 + ib // 2] = l_l
        else:
            y[4 + ib // 2] = to_u8(np.int64(y[4 + ib // 2]) | (l_l << 4))
        scales_h |= l_h << (2 * (ib % 8))
    y[2] = scales_h & 0xFF
    y[3] = (scales_h >> 8) & 0xFF
    _pack_q4(L, y[8:136], QK_K)


@njit(cache=True, error_model="numpy")
def _iq4_nl_row(x, y, qw, val):
    L = np.zeros(QK4_NL, np.uint8)
    weight = np.zeros(QK4_NL, np.float32)
    for i in range(x.shape[0] // QK4_NL):
        qwb = qw[QK4_NL * i:QK4_NL * (i + 1)]  # empty stays empty: C's NULL
        _iq4_nl_block(x[QK4_NL * i:QK4_NL * (i + 1)], y[IQ4_NL_SIZE * i:IQ4_NL_SIZE * (i + 1)], qwb, L, weight, val)


@njit(cache=True, error_model="numpy")
def _iq4_xs_row(x, y, qw, val):
    L = np.zeros(QK_K, np.uint8)
    weight = np.zeros(32, np.float32)
    scales = np.zeros(QK_K // 32, np.float32)
    for i in range(x.shape[0] // QK_K):
        qwb = qw[QK_K * i:QK_K * (i + 1)]
        _iq4_xs_block(x[QK_K * i:QK_K * (i + 1)], y[IQ4_XS_SIZE * i:IQ4_XS_SIZE * (i + 1)], qwb, L, weight, scales,
                      val)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq4_nl(x, qw, out, val):
    for r in prange(x.shape[0]):
        _iq4_nl_row(x[r], out[r], qw, val)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq4_xs(x, qw, out, val):
    for r in prange(x.shape[0]):
        _iq4_xs_row(x[r], out[r], qw, val)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_iq4_nl(raw, y, val):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for ib in range(out.shape[0] // QK4_NL):
            o = ib * IQ4_NL_SIZE
            d = get_fp16(b, o)
            for j in range(16):
                q = np.int64(b[o + 2 + j])
                out[ib * QK4_NL + j] = d * val[q & 0xF]
                out[ib * QK4_NL + j + 16] = d * val[q >> 4]


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_iq4_xs(raw, y, val):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for i in range(out.shape[0] // QK_K):
            o = i * IQ4_XS_SIZE
            d = get_fp16(b, o)
            scales_h = np.int64(b[o + 2]) | (np.int64(b[o + 3]) << 8)
            for ib in range(QK_K // 32):
                ls = ((np.int64(b[o + 4 + ib // 2]) >> (4 * (ib % 2))) & 0xF) | (((scales_h >> (2 * ib)) & 3) << 4)
                dl = d * f32(ls - 32)
                qo = o + 8 + 16 * ib
                yo = i * QK_K + 32 * ib
                for j in range(16):
                    q = np.int64(b[qo + j])
                    out[yo + j] = dl * val[q & 0xF]
                    out[yo + j + 16] = dl * val[q >> 4]


def _make(name: str, qdrv, ddrv, block: int, size: int):
    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk for this type on a (rows, cols) float32 matrix (imatrix: per-column weights)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.empty((rows, cols // block * size), dtype=np.uint8)
        qw = _NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        qdrv(x, qw, out, _KV)
        return out

    def dequantize(raw: np.ndarray, cols: int) -> np.ndarray:
        """dequantize_row_* of this type for every row of raw (rows, row_bytes)."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        y = np.empty((raw.shape[0], cols), dtype=np.float32)
        ddrv(raw, y, _KV)
        return y

    quantize.__name__ = f"quantize_{name.lower()}"
    dequantize.__name__ = f"dequantize_{name.lower()}"
    return quantize, dequantize


KERNELS = {
    "IQ4_NL": _make("IQ4_NL", _quantize_iq4_nl, _dequantize_iq4_nl, QK4_NL, IQ4_NL_SIZE),
    "IQ4_XS": _make("IQ4_XS", _quantize_iq4_xs, _dequantize_iq4_xs, QK_K, IQ4_XS_SIZE),
}
