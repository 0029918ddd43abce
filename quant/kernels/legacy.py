"""Legacy 32-weight block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: literal numba ports of ggml-quants.c, bit-exact.

quantize = ggml_quantize_chunk: `quantize_row_*_ref` without an imatrix, `quantize_row_*_impl` with one (Q8_0 always
uses the ref path). Float32 everywhere C uses float, C's operation order, no fastmath (no FMA contraction, no
reassociation). C's float -> small-int casts are emulated as x86-64 GCC compiles them (cvttss2si to int32, then the
low byte), so even out-of-range values from subnormal scales land on ggml's bytes.
Block layouts (ggml-common.h, little-endian): q4_0 = d, qs[16]; q4_1 = d, m, qs[16]; q5_0 = d, qh[4], qs[16];
q5_1 = d, m, qh[4], qs[16]; q8_0 = d, qs[32] (int8). d and m are ggml_half.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.kernels.common import get_fp16, put_fp16
from quant.kernels.search import make_qkx3_quants, make_qx_quants

f32 = np.float32
QK = 32
_NO_IMATRIX = np.zeros(0, dtype=np.float32)


@njit(cache=True, error_model="numpy")
def _cvt_i32(v):
    """C's float -> int conversion as x86-64 cvttss2si does it: truncate; NaN/out of range -> INT32_MIN."""
    if v >= -2147483648.0 and v < 2147483648.0:
        return np.int64(int(v))
    return np.int64(-2147483648)


@njit(cache=True, error_model="numpy")
def _i8(v):
    """int -> int8_t (low byte, two's complement)."""
    return ((v + 128) & 0xFF) - 128


@njit(cache=True, error_model="numpy")
def _roundf(v):
    """C roundf (half away from zero) for |v| < 2^31, returned as an int."""
    i = np.int64(int(v))
    r = v - f32(i)
    if r >= f32(0.5):
        i += 1
    elif r <= f32(-0.5):
        i -= 1
    return i


@njit(cache=True, error_model="numpy")
def _roundf_cvt(v):
    """(int)roundf(v) with cvttss2si semantics for NaN/Inf/huge v."""
    if v >= -2147483648.0 and v < 2147483648.0:
        return _roundf(v)
    return np.int64(-2147483648)


@njit(cache=True, error_model="numpy")
def _sigma2(x):
    """sum(x^2)/n over the whole row, accumulated sequentially in float32 as the *_impl functions do."""
    s = f32(0.0)
    for j in range(x.shape[0]):
        s += x[j] * x[j]
    return s / f32(x.shape[0])


@njit(cache=True, error_model="numpy")
def _weights(xb, qw, sigma2, weight):
    """weight[j] = qw[j] * sqrtf(sigma2 + xb[j]*xb[j]) (the legacy imatrix weighting)."""
    for j in range(QK):
        weight[j] = qw[j] * np.sqrt(sigma2 + xb[j] * xb[j])


# ---------------------------------------------------------------- symmetric: Q4_0, Q5_0 (ref)


@njit(cache=True, error_model="numpy")
def _absmax_signed(xb):
    """The value of largest magnitude (first one on ties), as the ref loops pick it."""
    amax = f32(0.0)
    mx = f32(0.0)
    for j in range(QK):
        v = xb[j]
        if amax < abs(v):
            amax = abs(v)
            mx = v
    return mx


@njit(cache=True, error_model="numpy")
def _q4_0_ref_row(x, out):
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 18
        mx = _absmax_signed(xb)
        d = mx / f32(-8.0)
        idl = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        put_fp16(out, o, d)
        fast = abs(mx) * abs(idl) <= f32(100.0)  # |x*id| <= |max*id|: the int8 cast is exact, no wrap
        for j in range(16):
            x0 = xb[j] * idl + f32(8.5)
            x1 = xb[j + 16] * idl + f32(8.5)
            if fast:
                xi0 = min(15, int(x0)) & 0xFF
                xi1 = min(15, int(x1)) & 0xFF
            else:  # id overflowed (subnormal d): NaN/Inf/huge products, cast as x86 does
                xi0 = min(15, _i8(_cvt_i32(x0))) & 0xFF
                xi1 = min(15, _i8(_cvt_i32(x1))) & 0xFF
            out[o + 2 + j] = (xi0 | (xi1 << 4)) & 0xFF


@njit(cache=True, error_model="numpy")
def _q5_0_ref_row(x, out):
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 22
        mx = _absmax_signed(xb)
        d = mx / f32(-16.0)
        idl = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        put_fp16(out, o, d)
        fast = abs(mx) * abs(idl) <= f32(100.0)  # |x*id| <= |max*id|: the int8 cast is exact, no wrap
        qh = 0
        for j in range(16):
            x0 = xb[j] * idl + f32(16.5)
            x1 = xb[j + 16] * idl + f32(16.5)
            if fast:
                xi0 = min(31, int(x0)) & 0xFF
                xi1 = min(31, int(x1)) & 0xFF
            else:
                xi0 = min(31, _i8(_cvt_i32(x0))) & 0xFF
                xi1 = min(31, _i8(_cvt_i32(x1))) & 0xFF
            out[o + 6 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
            qh |= ((xi0 & 0x10) >> 4) << j
            qh |= ((xi1 & 0x10) >> 4) << (j + 16)
        _put_u32(out, o + 2, qh)


@njit(cache=True, error_model="numpy")
def _put_u32(out, o, v):
    out[o] = v & 0xFF
    out[o + 1] = (v >> 8) & 0xFF
    out[o + 2] = (v >> 16) & 0xFF
    out[o + 3] = (v >> 24) & 0xFF


# ---------------------------------------------------------------- asymmetric: Q4_1, Q5_1 (ref)


@njit(cache=True, error_model="numpy")
def _minmax(xb):
    mn = f32(3.4028234663852886e38)
    mx = f32(-3.4028234663852886e38)
    for j in range(QK):
        v = xb[j]
        if v < mn:  # noqa: PLR1730 - C's compare-and-assign, kept literal
            mn = v
        if v > mx:  # noqa: PLR1730
            mx = v
    return mn, mx


@njit(cache=True, error_model="numpy")
def _q4_1_ref_row(x, out):
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 20
        mn, mx = _minmax(xb)
        d = (mx - mn) / f32(15.0)
        idl = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        put_fp16(out, o, d)
        put_fp16(out, o + 2, mn)
        if (mx - mn) * idl <= f32(100.0):  # (x-min)*id <= (max-min)*id: the int8 cast is exact, no wrap
            for j in range(16):
                xi0 = min(15, int((xb[j] - mn) * idl + f32(0.5)))
                xi1 = min(15, int((xb[j + 16] - mn) * idl + f32(0.5)))
                out[o + 4 + j] = (xi0 | (xi1 << 4)) & 0xFF
        else:  # Inf/NaN (max-min overflowed) or huge quotients: cast as x86 does
            for j in range(16):
                x0 = (xb[j] - mn) * idl
                x1 = (xb[j + 16] - mn) * idl
                xi0 = min(15, _i8(_cvt_i32(x0 + f32(0.5)))) & 0xFF
                xi1 = min(15, _i8(_cvt_i32(x1 + f32(0.5)))) & 0xFF
                out[o + 4 + j] = (xi0 | (xi1 << 4)) & 0xFF


@njit(cache=True, error_model="numpy")
def _q5_1_ref_row(x, out):
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 24
        mn, mx = _minmax(xb)
        d = (mx - mn) / f32(31.0)
        idl = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        put_fp16(out, o, d)
        put_fp16(out, o + 2, mn)
        fast = (mx - mn) * idl <= f32(100.0)  # (x-min)*id <= (max-min)*id: the uint8 cast is exact
        qh = 0
        for j in range(16):
            x0 = (xb[j] - mn) * idl + f32(0.5)
            x1 = (xb[j + 16] - mn) * idl + f32(0.5)
            if fast:
                xi0 = int(x0) & 0xFF
                xi1 = int(x1) & 0xFF
            else:
                xi0 = _cvt_i32(x0) & 0xFF
                xi1 = _cvt_i32(x1) & 0xFF
            out[o + 8 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
            qh |= ((xi0 & 0x10) >> 4) << j
            qh |= ((xi1 & 0x10) >> 4) << (j + 16)
        _put_u32(out, o + 4, qh)


# ---------------------------------------------------------------- Q8_0 (ref only; ggml ignores the imatrix)


@njit(cache=True, error_model="numpy")
def _q8_0_ref_row(x, out):
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        o = ib * 34
        amax = f32(0.0)
        for j in range(QK):
            a = abs(xb[j])
            amax = amax if amax > a else a  # noqa: FURB136 - C's MAX(amax, a), operand order kept
        d = amax / f32(127.0)
        idl = f32(1.0) / d if d != f32(0.0) else f32(0.0)
        put_fp16(out, o, d)
        if amax * idl < f32(1073741824.0):  # every |x*id| <= amax*id: the plain rounding cannot overflow
            for j in range(QK):
                out[o + 2 + j] = _roundf(xb[j] * idl) & 0xFF
        else:  # id overflowed (subnormal d): NaN/Inf/huge products, cast as x86 does
            for j in range(QK):
                out[o + 2 + j] = _roundf_cvt(xb[j] * idl) & 0xFF


# ---------------------------------------------------------------- imatrix (*_impl) paths


@njit(cache=True, error_model="numpy")
def _q4_0_impl_row(x, qw_row, out):
    sigma2 = _sigma2(x)
    weight = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.int8)
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _weights(xb, qw_row[ib * QK:(ib + 1) * QK], sigma2, weight)
        d = make_qx_quants(QK, 8, xb, L, 1, weight)
        o = ib * 18
        put_fp16(out, o, d)
        for j in range(16):
            out[o + 2 + j] = (np.int64(L[j]) | (np.int64(L[j + 16]) << 4)) & 0xFF


@njit(cache=True, error_model="numpy")
def _q5_0_impl_row(x, qw_row, out):
    sigma2 = _sigma2(x)
    weight = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.int8)
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _weights(xb, qw_row[ib * QK:(ib + 1) * QK], sigma2, weight)
        d = make_qx_quants(QK, 16, xb, L, 1, weight)
        o = ib * 22
        put_fp16(out, o, d)
        qh = 0
        for j in range(16):
            xi0 = np.int64(L[j]) & 0xFF
            xi1 = np.int64(L[j + 16]) & 0xFF
            out[o + 6 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
            qh |= ((xi0 & 0x10) >> 4) << j
            qh |= ((xi1 & 0x10) >> 4) << (j + 16)
        _put_u32(out, o + 2, qh)


@njit(cache=True, error_model="numpy")
def _q4_1_impl_row(x, qw_row, out):
    sigma2 = _sigma2(x)
    weight = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.uint8)
    Laux = np.empty(QK, dtype=np.uint8)
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _weights(xb, qw_row[ib * QK:(ib + 1) * QK], sigma2, weight)
        d, the_min = make_qkx3_quants(QK, 15, xb, weight, L, Laux, f32(-0.9), f32(0.05), 36, False)
        o = ib * 20
        put_fp16(out, o, d)
        put_fp16(out, o + 2, -the_min)
        for j in range(16):
            out[o + 4 + j] = (np.int64(L[j]) | (np.int64(L[j + 16]) << 4)) & 0xFF


@njit(cache=True, error_model="numpy")
def _q5_1_impl_row(x, qw_row, out):
    sigma2 = _sigma2(x)
    weight = np.empty(QK, dtype=np.float32)
    L = np.empty(QK, dtype=np.uint8)
    Laux = np.empty(QK, dtype=np.uint8)
    for ib in range(x.shape[0] // QK):
        xb = x[ib * QK:(ib + 1) * QK]
        _weights(xb, qw_row[ib * QK:(ib + 1) * QK], sigma2, weight)
        d, the_min = make_qkx3_quants(QK, 31, xb, weight, L, Laux, f32(-0.9), f32(0.05), 36, False)
        o = ib * 24
        put_fp16(out, o, d)
        put_fp16(out, o + 2, -the_min)
        qh = 0
        for j in range(16):
            xi0 = np.int64(L[j])
            xi1 = np.int64(L[j + 16])
            out[o + 8 + j] = (xi0 & 0x0F) | ((xi1 & 0x0F) << 4)
            qh |= ((xi0 & 0x10) >> 4) << j
            qh |= ((xi1 & 0x10) >> 4) << (j + 16)
        _put_u32(out, o + 4, qh)


# ---------------------------------------------------------------- row drivers


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q4_0(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.shape[0] == 0:
            _q4_0_ref_row(x[r], out[r])
        else:
            _q4_0_impl_row(x[r], qw, out[r])


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q4_1(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.shape[0] == 0:
            _q4_1_ref_row(x[r], out[r])
        else:
            _q4_1_impl_row(x[r], qw, out[r])


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q5_0(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.shape[0] == 0:
            _q5_0_ref_row(x[r], out[r])
        else:
            _q5_0_impl_row(x[r], qw, out[r])


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q5_1(x, qw, out):
    for r in prange(x.shape[0]):
        if qw.shape[0] == 0:
            _q5_1_ref_row(x[r], out[r])
        else:
            _q5_1_impl_row(x[r], qw, out[r])


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q8_0(x, qw, out):
    for r in prange(x.shape[0]):
        _q8_0_ref_row(x[r], out[r])


# ---------------------------------------------------------------- dequantizers (dequantize_row_*)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q4_0(raw, y):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for ib in range(out.shape[0] // QK):
            o = ib * 18
            d = get_fp16(b, o)
            for j in range(16):
                q = np.int64(b[o + 2 + j])
                out[ib * QK + j] = f32((q & 0x0F) - 8) * d
                out[ib * QK + j + 16] = f32((q >> 4) - 8) * d


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q4_1(raw, y):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for ib in range(out.shape[0] // QK):
            o = ib * 20
            d = get_fp16(b, o)
            m = get_fp16(b, o + 2)
            for j in range(16):
                q = np.int64(b[o + 4 + j])
                out[ib * QK + j] = f32(q & 0x0F) * d + m
                out[ib * QK + j + 16] = f32(q >> 4) * d + m


@njit(cache=True, error_model="numpy")
def _get_u32(b, o):
    return np.int64(b[o]) | (np.int64(b[o + 1]) << 8) | (np.int64(b[o + 2]) << 16) | (np.int64(b[o + 3]) << 24)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q5_0(raw, y):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for ib in range(out.shape[0] // QK):
            o = ib * 22
            d = get_fp16(b, o)
            qh = _get_u32(b, o + 2)
            for j in range(16):
                q = np.int64(b[o + 6 + j])
                xh_0 = ((qh >> j) << 4) & 0x10
                xh_1 = (qh >> (j + 12)) & 0x10
                out[ib * QK + j] = f32(((q & 0x0F) | xh_0) - 16) * d
                out[ib * QK + j + 16] = f32(((q >> 4) | xh_1) - 16) * d


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q5_1(raw, y):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for ib in range(out.shape[0] // QK):
            o = ib * 24
            d = get_fp16(b, o)
            m = get_fp16(b, o + 2)
            qh = _get_u32(b, o + 4)
            for j in range(16):
                q = np.int64(b[o + 8 + j])
                xh_0 = ((qh >> j) << 4) & 0x10
                xh_1 = (qh >> (j + 12)) & 0x10
                out[ib * QK + j] = f32((q & 0x0F) | xh_0) * d + m
                out[ib * QK + j + 16] = f32((q >> 4) | xh_1) * d + m


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q8_0(raw, y):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for ib in range(out.shape[0] // QK):
            o = ib * 34
            d = get_fp16(b, o)
            for j in range(QK):
                out[ib * QK + j] = f32(_i8(np.int64(b[o + 2 + j]))) * d


# ---------------------------------------------------------------- public table

_TYPE_SIZE = {"Q4_0": 18, "Q4_1": 20, "Q5_0": 22, "Q5_1": 24, "Q8_0": 34}


def _make(name: str, qfn, dqfn):
    size = _TYPE_SIZE[name]

    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk for this type on a (rows, cols) float32 matrix (imatrix: per-column weights)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.empty((rows, cols // QK * size), dtype=np.uint8)
        qw = _NO_IMATRIX if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        qfn(x, qw, out)
        return out

    def dequantize(raw: np.ndarray, cols: int) -> np.ndarray:
        """dequantize_row_* of this type for every row of raw (rows, row_bytes)."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        y = np.empty((raw.shape[0], cols), dtype=np.float32)
        dqfn(raw, y)
        return y

    quantize.__name__ = f"quantize_{name.lower()}"
    dequantize.__name__ = f"dequantize_{name.lower()}"
    return quantize, dequantize


KERNELS = {
    "Q4_0": _make("Q4_0", _quantize_q4_0, _dequantize_q4_0),
    "Q4_1": _make("Q4_1", _quantize_q4_1, _dequantize_q4_1),
    "Q5_0": _make("Q5_0", _quantize_q5_0, _dequantize_q5_0),
    "Q5_1": _make("Q5_1", _quantize_q5_1, _dequantize_q5_1),
    "Q8_0": _make("Q8_0", _quantize_q8_0, _dequantize_q8_0),
}
