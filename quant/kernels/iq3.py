"""IQ3_XXS and IQ3_S kernels: literal numba ports of ggml-quants.c's quantize_row_iq3_xxs_impl /
quantize_row_iq3_s_impl and dequantize_row_iq3_xxs / _s, bit-exact with ggml.

Both search a D4-lattice grid (256 / 512 points of 4 coordinates, tables from quant.kernels.iq_tables) for every
group of 4 weights, with a per-32 scale search; the imatrix is optional (without one the weights are x^2).
Where ggml would abort (GGML_ASSERT: no neighbour at a finite distance, e.g. when x^2 overflows to inf) the row
driver reports it and `quantize` raises QuantizationError instead of producing bytes ggml never would.
Rows run in parallel (prange); results do not depend on it.
"""
# ruff: noqa: PLR1730  -- C's `if (a > b) b = a` kept literally: min()/max() differ on NaN/-0.0
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.kernels.common import get_fp16, nearest_int, put_fp16
from quant.kernels.iq_tables import KMASK, KSIGNS, best_neighbour4, run_quantize, tables, value_grid

f32 = np.float32
QK_K = 256
IQ3_XXS_SIZE = 98  # d qs[64] scales_and_signs[32]
IQ3_S_SIZE = 110  # d qs[64] qh[8] signs[32] scales[4]
GROUP_MAX_EPS_IQ3_XXS = np.float32(1e-8)
KMAXQ = 8

@njit(cache=True, error_model="numpy")
def _sub_weights(xb, qwb, sigma2, n, weight, waux):
    if qwb.shape[0] > 0:
        for i in range(n):
            weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        for i in range(n):
            weight[i] = xb[i] * xb[i]
    for i in range(n):
        waux[i] = np.sqrt(weight[i])


@njit(cache=True, error_model="numpy")
def _levels(id_, xval, L, k):
    """Levels of group k (4 values) at inverse scale id_, clamped to [0, 7]; returns the packed kmap key."""
    u = 0
    for i in range(4):
        l = nearest_int(f32(0.5) * (id_ * xval[4 * k + i] - f32(1.0)))
        l = max(0, min(KMAXQ - 1, l))
        L[4 * k + i] = l
        u |= l << (3 * i)
    return u


@njit(cache=True, error_model="numpy")
def _sums(n, weight, xval, L):
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for i in range(n):
        w = weight[i]
        q = f32(2 * np.int64(L[i]) + 1)
        sumqx += w * xval[i] * q
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def _search(n, nis, xval, weight, waux, L, Laux, on_grid, on_grid_aux, gv, lv, kmap, nb, init_on_grid, skip_on_grid):
    """The shared scale search + off-grid repair of both IQ3 types on one sub-block of n weights.

    Returns (scale, ok); ok False where ggml aborts."""
    ngroups = n // 4
    mx = xval[0]
    for i in range(1, n):
        mx = mx if mx > xval[i] else xval[i]
    best = f32(0.0)
    scale = mx / f32(2 * KMAXQ - 1)
    for k in range(ngroups):
        on_grid[k] = init_on_grid
    for is_ in range(-nis, nis + 1):
        id_ = (f32(2 * KMAXQ - 1) + f32(is_) * f32(0.2)) / mx
        this_scale = f32(1.0) / id_
        for k in range(ngroups):
            u = _levels(id_, xval, Laux, k)
            gi = kmap[u]
            on_grid_aux[k] = True
            if gi < 0:
                on_grid_aux[k] = False
                gi = best_neighbour4(nb, -gi - 1, gv, xval, waux, this_scale, 4 * k)
                if gi < 0:
                    return scale, False
                for i in range(4):
                    Laux[4 * k + i] = lv[gi, i]
        sumqx, sumq2 = _sums(n, weight, xval, Laux)
        if sumq2 > f32(0.0) and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            for i in range(n):
                L[i] = Laux[i]
            for k in range(ngroups):
                on_grid[k] = on_grid_aux[k]
    n_not_ongrid = 0
    for k in range(ngroups):
        if not on_grid[k]:
            n_not_ongrid += 1
    if n_not_ongrid > 0 and scale > f32(0.0):
        id_ = f32(1.0) / scale
        for k in range(ngroups):
            if skip_on_grid and on_grid[k]:
                continue
            u = 0
            for i in range(4):
                l = nearest_int(f32(0.5) * (id_ * xval[4 * k + i] - f32(1.0)))
                l = max(0, min(KMAXQ - 1, l))
                u |= l << (3 * i)
            gi = kmap[u]
            if gi < 0:
                gi = best_neighbour4(nb, -gi - 1, gv, xval, waux, scale, 4 * k)
                if gi < 0:
                    return scale, False
            for i in range(4):
                L[4 * k + i] = lv[gi, i]
        sumqx, sumq2 = _sums(n, weight, xval, L)
        if sumq2 > f32(0.0):
            scale = sumqx / sumq2
    return scale, True


@njit(cache=True, error_model="numpy")
def _grid_index(L, k, kmap):
    u = 0
    for i in range(4):
        u |= np.int64(L[4 * k + i]) << (3 * i)
    return kmap[u]


@njit(cache=True, error_model="numpy")
def _iq3_xxs_row(x, y, qw, kmap, nb, gv, lv):
    """quantize_row_iq3_xxs_impl(256, ...) on one row; returns False where ggml aborts."""
    scales = np.zeros(QK_K // 32, np.float32)
    weight = np.zeros(32, np.float32)
    waux = np.zeros(32, np.float32)
    xval = np.zeros(32, np.float32)
    L = np.zeros(32, np.int8)
    Laux = np.zeros(32, np.int8)
    on_grid = np.zeros(8, np.bool_)
    on_grid_aux = np.zeros(8, np.bool_)
    block_signs = np.zeros(4, np.int64)
    q3 = np.zeros(96, np.uint8)
    sas = np.zeros(8, np.int64)  # scales_and_signs (uint32)
    for ibl in range(x.shape[0] // QK_K):
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        yb = y[IQ3_XXS_SIZE * ibl:IQ3_XXS_SIZE * (ibl + 1)]
        put_fp16(yb, 0, f32(0.0))
        q3[:] = 0
        sas[:] = 0
        max_scale = f32(0.0)
        sumx2 = f32(0.0)
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = f32(2.0) * sumx2 / f32(QK_K)
        for ib in range(QK_K // 32):
            xb = xbl[32 * ib:32 * ib + 32]
            qwb = qw[QK_K * ibl + 32 * ib:QK_K * ibl + 32 * ib + 32] if qw.shape[0] > 0 else qw
            _sub_weights(xb, qwb, sigma2, 32, weight, waux)
            for k in range(4):
                nflip = 0
                s = 0
                for i in range(8):
                    if xb[8 * k + i] >= f32(0.0):
                        xval[8 * k + i] = xb[8 * k + i]
                    else:
                        xval[8 * k + i] = -xb[8 * k + i]
                        nflip += 1
                        s |= 1 << i
                if nflip % 2:
                    imin = 0
                    mn = weight[8 * k] * xb[8 * k] * xb[8 * k]
                    for i in range(1, 8):
                        ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                        if ax < mn:
                            mn = ax
                            imin = i
                    xval[8 * k + imin] = -xval[8 * k + imin]
                    s ^= 1 << imin
                block_signs[k] = s & 127
            mx = xval[0]
            for i in range(1, 32):
                mx = mx if mx > xval[i] else xval[i]
            L[:] = 0
            if mx < GROUP_MAX_EPS_IQ3_XXS:
                scales[ib] = f32(0.0)
                continue
            scale, ok = _search(32, 15, xval, weight, waux, L, Laux, on_grid, on_grid_aux, gv, lv, kmap, nb,
                                True, True)
            if not ok:
                return False
            if scale < f32(0.0):
                scale = -scale
                for k in range(4):
                    block_signs[k] = (~block_signs[k]) & 127
            for k in range(8):
                gi = _grid_index(L, k, kmap)
                if gi < 0:
                    return False
                q3[8 * ib + k] = gi
            sas[ib] = block_signs[0] | (block_signs[1] << 7) | (block_signs[2] << 14) | (block_signs[3] << 21)
            if not scale >= f32(0.0):
                return False
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            for i in range(2, IQ3_XXS_SIZE):
                yb[i] = 0
            continue
        d = max_scale / f32(31.0)
        put_fp16(yb, 0, d * f32(1.0125))
        id_ = f32(1.0) / d
        for ib in range(QK_K // 32):
            l = nearest_int(f32(0.5) * (id_ * scales[ib] - f32(1.0)))
            l = max(0, min(15, l))
            sas[ib] |= (l << 28) & 0xFFFFFFFF
        for i in range(64):
            yb[2 + i] = q3[i]
        for ib in range(8):
            v = sas[ib]
            for b in range(4):
                yb[66 + 4 * ib + b] = (v >> (8 * b)) & 0xFF
    return True


@njit(cache=True, error_model="numpy")
def _iq3_s_row(x, y, qw, kmap, nb, gv, lv):
    """quantize_row_iq3_s_impl(32, ...) on one row; returns False where ggml aborts."""
    bs = 32
    scales = np.zeros(QK_K // bs, np.float32)
    weight = np.zeros(bs, np.float32)
    waux = np.zeros(bs, np.float32)
    xval = np.zeros(bs, np.float32)
    L = np.zeros(bs, np.int8)
    Laux = np.zeros(bs, np.int8)
    on_grid = np.zeros(bs // 4, np.bool_)
    on_grid_aux = np.zeros(bs // 4, np.bool_)
    block_signs = np.zeros(bs // 8, np.int64)
    for ibl in range(x.shape[0] // QK_K):
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        yb = y[IQ3_S_SIZE * ibl:IQ3_S_SIZE * (ibl + 1)]
        yb[:] = 0
        qs = 2  # running pointers: ggml advances them only for sub-blocks it quantizes
        signs = 74
        max_scale = f32(0.0)
        sumx2 = f32(0.0)
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = f32(2.0) * sumx2 / f32(QK_K)
        for ib in range(QK_K // bs):
            xb = xbl[bs * ib:bs * ib + bs]
            qwb = qw[QK_K * ibl + bs * ib:QK_K * ibl + bs * ib + bs] if qw.shape[0] > 0 else qw
            _sub_weights(xb, qwb, sigma2, bs, weight, waux)
            for k in range(bs // 8):
                s = 0
                for i in range(8):
                    if xb[8 * k + i] >= f32(0.0):
                        xval[8 * k + i] = xb[8 * k + i]
                    else:
                        xval[8 * k + i] = -xb[8 * k + i]
                        s |= 1 << i
                block_signs[k] = s
            mx = xval[0]
            for i in range(1, bs):
                mx = mx if mx > xval[i] else xval[i]
            L[:] = 0
            if not mx:
                scales[ib] = f32(0.0)
                continue
            scale, ok = _search(bs, 9, xval, weight, waux, L, Laux, on_grid, on_grid_aux, gv, lv, kmap, nb,
                                False, False)
            if not ok:
                return False
            if scale < f32(0.0):
                scale = -scale
                for k in range(bs // 8):
                    block_signs[k] = (~block_signs[k]) & 0xFF
            for k in range(bs // 4):
                gi = _grid_index(L, k, kmap)
                if gi < 0:
                    return False
                yb[qs + k] = gi & 255
                j = ib * (bs // 4) + k
                yb[66 + j // 8] |= (gi >> 8) << (j % 8)
            qs += bs // 4
            for k in range(bs // 8):
                yb[signs + k] = block_signs[k]
            signs += bs // 8
            if not scale >= f32(0.0):
                return False
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            continue
        d = max_scale / f32(31.0)
        put_fp16(yb, 0, d * f32(1.033))
        id_ = f32(1.0) / d
        for ib in range(0, QK_K // bs, 2):
            l1 = nearest_int(f32(0.5) * (id_ * scales[ib] - f32(1.0)))
            l1 = max(0, min(15, l1))
            l2 = nearest_int(f32(0.5) * (id_ * scales[ib + 1] - f32(1.0)))
            l2 = max(0, min(15, l2))
            yb[106 + ib // 2] = l1 | (l2 << 4)
    return True


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq3_xxs(x, qw, out, ok, grid, kmap, nb, gv, lv):
    for r in prange(x.shape[0]):
        ok[r] = _iq3_xxs_row(x[r], out[r], qw, kmap, nb, gv, lv)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq3_s(x, qw, out, ok, grid, kmap, nb, gv, lv):
    for r in prange(x.shape[0]):
        ok[r] = _iq3_s_row(x[r], out[r], qw, kmap, nb, gv, lv)


# ----------------------------------------------------------------------------------------------- dequantize


@njit(cache=True, error_model="numpy")
def _iq3_xxs_deq_row(b, y, dgrid, ksigns):
    for i in range(y.shape[0] // QK_K):
        blk = b[IQ3_XXS_SIZE * i:IQ3_XXS_SIZE * (i + 1)]
        d = get_fp16(blk, 0)
        o = QK_K * i
        for ib32 in range(QK_K // 32):
            a = 66 + 4 * ib32
            aux32 = (np.int64(blk[a]) | (np.int64(blk[a + 1]) << 8) | (np.int64(blk[a + 2]) << 16)
                     | (np.int64(blk[a + 3]) << 24))
            db = d * (f32(0.5) + f32(aux32 >> 28)) * f32(0.5)
            qs = 2 + 8 * ib32
            for l in range(4):
                signs = ksigns[(aux32 >> (7 * l)) & 127]
                g1 = np.int64(blk[qs + 2 * l])
                g2 = np.int64(blk[qs + 2 * l + 1])
                for j in range(4):
                    y[o + j] = db * f32(dgrid[g1, j]) * (f32(-1.0) if signs & KMASK[j] else f32(1.0))
                    y[o + j + 4] = db * f32(dgrid[g2, j]) * (f32(-1.0) if signs & KMASK[j + 4] else f32(1.0))
                o += 8


@njit(cache=True, error_model="numpy")
def _iq3_s_deq_row(b, y, dgrid):
    for i in range(y.shape[0] // QK_K):
        blk = b[IQ3_S_SIZE * i:IQ3_S_SIZE * (i + 1)]
        d = get_fp16(blk, 0)
        o = QK_K * i
        qs = 2
        qh = 66
        signs = 74
        for ib32 in range(0, QK_K // 32, 2):
            sc = np.int64(blk[106 + ib32 // 2])
            db1 = d * f32(1 + 2 * (sc & 0xF))
            db2 = d * f32(1 + 2 * (sc >> 4))
            for half in range(2):
                db = db1 if half == 0 else db2
                h = np.int64(blk[qh + half])
                for l in range(4):
                    g1 = np.int64(blk[qs + 2 * l]) | ((h << (8 - 2 * l)) & 256)
                    g2 = np.int64(blk[qs + 2 * l + 1]) | ((h << (7 - 2 * l)) & 256)
                    sg = np.int64(blk[signs + l])
                    for j in range(4):
                        y[o + j] = db * f32(dgrid[g1, j]) * (f32(-1.0) if sg & KMASK[j] else f32(1.0))
                        y[o + j + 4] = db * f32(dgrid[g2, j]) * (f32(-1.0) if sg & KMASK[j + 4] else f32(1.0))
                    o += 8
                qs += 8
                signs += 4
            qh += 2


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_iq3_xxs(raw, out, dgrid, ksigns):
    for r in prange(raw.shape[0]):
        _iq3_xxs_deq_row(raw[r], out[r], dgrid, ksigns)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_iq3_s(raw, out, dgrid):
    for r in prange(raw.shape[0]):
        _iq3_s_deq_row(raw[r], out[r], dgrid)


# the byte values of ggml-common.h's iq3xxs_grid per level l (IQ3_S's iq3s_grid holds 2l+1)
_IQ3XXS_VALUES = np.array([4, 12, 20, 28, 36, 44, 52, 62], np.int64)


def dequant_grid(qtype: str) -> np.ndarray:
    """ggml-common.h's iq3xxs_grid / iq3s_grid as (points, 4) bytes, derived from the quantizer grid."""
    levels = (tables(qtype).grid.astype(np.int64) - 1) // 2
    if qtype == "IQ3_XXS":
        return _IQ3XXS_VALUES[levels].astype(np.uint8)
    return (2 * levels + 1).astype(np.uint8)


def _make(qtype: str):
    size = IQ3_XXS_SIZE if qtype == "IQ3_XXS" else IQ3_S_SIZE

    def quantize(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """Quantize float32 (rows, cols) to `qtype` blocks exactly as ggml_quantize_chunk does."""
        return run_quantize(qtype, _quantize_iq3_xxs if qtype == "IQ3_XXS" else _quantize_iq3_s, size, x, imatrix,
                            value_grid(qtype))

    def dequantize(raw: np.ndarray, cols: int) -> np.ndarray:
        """Decode `qtype` blocks (rows, row_bytes) to float32 (rows, cols), as dequantize_row_* does."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty((raw.shape[0], cols), dtype=np.float32)
        g = dequant_grid(qtype)
        if qtype == "IQ3_XXS":
            _dequantize_iq3_xxs(raw, out, g, KSIGNS)
        else:
            _dequantize_iq3_s(raw, out, g)
        assert raw.shape[1] == cols // QK_K * size
        return out

    quantize.__name__ = f"quantize_{qtype.lower()}"
    dequantize.__name__ = f"dequantize_{qtype.lower()}"
    return quantize, dequantize


KERNELS = {name: _make(name) for name in ("IQ3_XXS", "IQ3_S")}
