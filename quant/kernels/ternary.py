"""TQ1_0 and TQ2_0 (ternary, BitNet b1.58 / TriLM): literal numba ports of ggml-quants.c, bit-exact.

quantize = ggml_quantize_chunk -> quantize_tq1_0 / quantize_tq2_0, which ignore quant_weights (an imatrix changes
nothing) and run quantize_row_tq*_0_ref: d = max|x| of the 256-weight block, each weight -> lroundf(x/d) + 1 in
{0, 1, 2}. TQ1_0 packs 5 trits per byte (base 3, then a ceiling division mapping 0..242 onto 0..255), the last 16
weights 4 per byte; TQ2_0 packs 2 bits per weight. lroundf is emulated exactly (half away from zero) and so is what
x86-64 makes of it when 1/d overflows (Inf/NaN -> LONG_MIN, whose low 32 bits + 1 give the trit 1).
Block layouts (ggml-common.h): tq1_0 = qs[48], qh[4], d; tq2_0 = qs[64], d (d is ggml_half).
"""
# ruff: noqa: PLR1730  -- C's `if (a > b) b = a` kept literally: min()/max() differ on NaN/-0.0
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.kernels.common import get_fp16, put_fp16

f32 = np.float32
QK_K = 256
TQ1_0_SIZE = 54  # qs[48] qh[4] d
TQ2_0_SIZE = 66  # qs[64] d
_LONG_MIN = np.int64(-9223372036854775807 - 1)


@njit(cache=True, error_model="numpy")
def lroundf(v):
    """glibc's lroundf on a float32 (half away from zero); NaN/Inf/|v| >= 2^63 -> (long)v = LONG_MIN, as on x86-64."""
    a = abs(np.float64(v))
    if a < 9.223372036854775808e18:  # also False for NaN
        r = np.int64(np.floor(a + 0.5))  # exact: a float32 plus 0.5 is exact in float64
        return -r if v < f32(0.0) else r
    return _LONG_MIN


@njit(cache=True, error_model="numpy")
def _trit(v):
    """`int xi = lroundf(v) + 1`: the C long -> int conversion keeps the low 32 bits (only the low 8 are used).
    |v| < 1.5 (every v when 1/d is finite) takes the comparisons lroundf amounts to there."""
    if abs(v) < f32(0.5):
        return 1
    if v >= f32(0.5) and v < f32(1.5):
        return 2
    if v <= f32(-0.5) and v > f32(-1.5):
        return 0
    return (lroundf(v) + 1) & 0xFFFFFFFF


@njit(cache=True, error_model="numpy")
def _absmax_inv(x):
    """amax = MAX(amax, fabsf(v)) over the block; returns (d = amax, id = d ? 1/d : 0)."""
    amax = f32(0.0)
    for j in range(QK_K):
        a = abs(x[j])
        amax = amax if amax > a else a  # noqa: FURB136 - C's MAX(amax, fabsf(v)), operand order kept
    idl = f32(1.0) / amax if amax != f32(0.0) else f32(0.0)
    return amax, idl


@njit(cache=True, error_model="numpy")
def _tq1_0_block(x, y):
    d, idl = _absmax_inv(x)
    put_fp16(y, 52, d)
    # 5 trits per byte along 32 bytes (weights 0..159), then along 16 bytes (160..239)
    for m in range(32):
        q = 0
        for n in range(5):
            q = (q * 3 + _trit(x[m + n * 32] * idl)) & 0xFF
        y[m] = ((q * 256 + 242) // 243) & 0xFF
    for m in range(16):
        q = 0
        for n in range(5):
            q = (q * 3 + _trit(x[160 + m + n * 16] * idl)) & 0xFF
        y[32 + m] = ((q * 256 + 242) // 243) & 0xFF
    # 4 trits per byte (weights 240..255), the first one in the most significant trit
    for j in range(4):
        q = 0
        for m in range(4):
            q = (q * 3 + _trit(x[240 + j + m * 4] * idl)) & 0xFF
        q = (q * 3) & 0xFF
        y[48 + j] = ((q * 256 + 242) // 243) & 0xFF


@njit(cache=True, error_model="numpy")
def _tq2_0_block(x, y):
    d, idl = _absmax_inv(x)
    put_fp16(y, 64, d)
    for jj in range(2):
        for m in range(32):
            q = 0
            for n in range(4):
                q += (_trit(x[128 * jj + m + n * 32] * idl) & 3) << (2 * n)
            y[32 * jj + m] = q & 0xFF


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_tq1_0(x, out):
    for r in prange(x.shape[0]):
        for i in range(x.shape[1] // QK_K):
            _tq1_0_block(x[r, QK_K * i:QK_K * (i + 1)], out[r, TQ1_0_SIZE * i:TQ1_0_SIZE * (i + 1)])


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_tq2_0(x, out):
    for r in prange(x.shape[0]):
        for i in range(x.shape[1] // QK_K):
            _tq2_0_block(x[r, QK_K * i:QK_K * (i + 1)], out[r, TQ2_0_SIZE * i:TQ2_0_SIZE * (i + 1)])


@njit(cache=True, error_model="numpy")
def _tq1_trit_value(byte, pow3):
    """dequantize_row_tq1_0: q = (uint8)(byte * pow3[n]); xi = (q * 3) >> 8; the trit minus 1."""
    q = (np.int64(byte) * pow3) & 0xFF
    return ((q * 3) >> 8) - 1


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_tq1_0(raw, y):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for i in range(out.shape[0] // QK_K):
            o = i * TQ1_0_SIZE
            d = get_fp16(b, o + 52)
            yo = i * QK_K
            pow3 = 1
            for n in range(5):
                for m in range(32):
                    out[yo] = f32(_tq1_trit_value(b[o + m], pow3)) * d
                    yo += 1
                pow3 *= 3
            pow3 = 1
            for n in range(5):
                for m in range(16):
                    out[yo] = f32(_tq1_trit_value(b[o + 32 + m], pow3)) * d
                    yo += 1
                pow3 *= 3
            pow3 = 1
            for n in range(4):
                for j in range(4):
                    out[yo] = f32(_tq1_trit_value(b[o + 48 + j], pow3)) * d
                    yo += 1
                pow3 *= 3


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_tq2_0(raw, y):
    for r in prange(raw.shape[0]):
        b, out = raw[r], y[r]
        for i in range(out.shape[0] // QK_K):
            o = i * TQ2_0_SIZE
            d = get_fp16(b, o + 64)
            yo = i * QK_K
            for jj in range(2):
                for l in range(4):
                    for m in range(32):
                        q = (np.int64(b[o + 32 * jj + m]) >> (2 * l)) & 3
                        out[yo] = f32(q - 1) * d
                        yo += 1


def _make(name: str, qdrv, ddrv, size: int):
    def quantize(x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
        """ggml_quantize_chunk for this type on a (rows, cols) float32 matrix (the imatrix is unused, as in ggml)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.empty((rows, cols // QK_K * size), dtype=np.uint8)
        qdrv(x, out)
        return out

    def dequantize(raw: np.ndarray, cols: int) -> np.ndarray:
        """dequantize_row_* of this type for every row of raw (rows, row_bytes)."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        y = np.empty((raw.shape[0], cols), dtype=np.float32)
        ddrv(raw, y)
        return y

    quantize.__name__ = f"quantize_{name.lower()}"
    dequantize.__name__ = f"dequantize_{name.lower()}"
    return quantize, dequantize


KERNELS = {
    "TQ1_0": _make("TQ1_0", _quantize_tq1_0, _dequantize_tq1_0, TQ1_0_SIZE),
    "TQ2_0": _make("TQ2_0", _quantize_tq2_0, _dequantize_tq2_0, TQ2_0_SIZE),
}
