"""IQ2_XXS, IQ2_XS and IQ2_S kernels: literal numba ports of ggml-quants.c's quantize_row_iq2_xxs_impl /
iq2_xs_impl / iq2_s_impl and dequantize_row_iq2_*, bit-exact with ggml.

Each group of 8 weights (magnitudes; signs stored apart) is snapped to an E8-lattice grid of 256 / 512 / 1024
points (tables from quant.kernels.iq_tables) under a per-32 (XXS) or per-16 (XS, S) scale search. IQ2_XXS and IQ2_XS
need an importance matrix (ggml_quantize_requires_imatrix; quant.api refuses them without one); IQ2_S does not.
Where ggml would abort (GGML_ASSERT) the driver reports it and QuantizationError is raised.
"""
# ruff: noqa: PLR1730  -- C's `if (a > b) b = a` kept literally: min()/max() differ on NaN/-0.0
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.kernels.common import get_fp16, nearest_int, put_fp16
from quant.kernels.iq_tables import KMASK, KSIGNS, best_neighbour8, run_quantize, tables, value_grid
from quant.kernels.search import GROUP_MAX_EPS, make_qp_quants

f32 = np.float32
QK_K = 256
IQ2_XXS_SIZE = 66  # d qs[32 x u16]
IQ2_XS_SIZE = 74  # d qs[32 x u16] scales[8]
IQ2_S_SIZE = 82  # d qs[64] qh[8] scales[8]
GROUP_MAX_EPS_IQ2_S = np.float32(1e-8)
KMAXQ = 3


@njit(cache=True, error_model="numpy")
def _signs(xb, weight, xval, n, parity, block_signs):
    """xval = |xb| with the sign bits per 8; with `parity` (XXS, XS) an odd count of negatives flips back the
    element of least weight*x^2 so the 7 stored bits imply the 8th."""
    for k in range(n // 8):
        nflip = 0
        s = 0
        for i in range(8):
            if xb[8 * k + i] >= f32(0.0):
                xval[8 * k + i] = xb[8 * k + i]
            else:
                xval[8 * k + i] = -xb[8 * k + i]
                nflip += 1
                s |= 1 << i
        if parity:
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
        else:
            block_signs[k] = s


@njit(cache=True, error_model="numpy")
def _levels(id_, xval, L, k):
    u = 0
    for i in range(8):
        l = nearest_int(f32(0.5) * (id_ * xval[8 * k + i] - f32(1.0)))
        l = max(0, min(KMAXQ - 1, l))
        L[8 * k + i] = l
        u |= l << (2 * i)
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
def _grid_index(L, k, kmap):
    u = 0
    for i in range(8):
        u |= np.int64(L[8 * k + i]) << (2 * i)
    return kmap[u]


@njit(cache=True, error_model="numpy")
def _search(n, nis, denom, scale, xval, weight, waux, L, Laux, on_grid, on_grid_aux, gv, lv, kmap, nb, xxs):
    """Scale search over is in [-nis, nis] (id = (5 + 0.1 is)/denom), then the off-grid repair: IQ2_XXS (`xxs`)
    re-snaps every group when scale > 0, IQ2_XS/S only the off-grid ones. Returns (scale, ok)."""
    ngroups = n // 8
    best = f32(0.0)
    for k in range(ngroups):
        on_grid[k] = True
    for is_ in range(-nis, nis + 1):
        id_ = (f32(2 * KMAXQ - 1) + f32(is_) * f32(0.1)) / denom
        this_scale = f32(1.0) / id_
        for k in range(ngroups):
            u = _levels(id_, xval, Laux, k)
            gi = kmap[u]
            on_grid_aux[k] = True
            if gi < 0:
                on_grid_aux[k] = False
                gi = best_neighbour8(nb, -gi - 1, gv, xval, waux, this_scale, 8 * k)
                if gi < 0:
                    return scale, False
                for i in range(8):
                    Laux[8 * k + i] = lv[gi, i]
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
    if (xxs or n_not_ongrid > 0) and scale > f32(0.0):
        id_ = f32(1.0) / scale
        for k in range(ngroups):
            if not xxs and on_grid[k]:
                continue
            u = _levels(id_, xval, L, k)
            gi = kmap[u]
            if gi < 0:
                gi = best_neighbour8(nb, -gi - 1, gv, xval, waux, scale, 8 * k)
                if gi < 0:
                    return scale, False
                for i in range(8):
                    L[8 * k + i] = lv[gi, i]
        sumqx, sumq2 = _sums(n, weight, xval, L)
        if sumq2 > f32(0.0):
            scale = sumqx / sumq2
    return scale, True


@njit(cache=True, error_model="numpy")
def _iq2_row(x, y, qw, kmap, nb, gv, lv, kind):
    """quantize_row_iq2_{xxs,xs,s}_impl on one row (kind 0, 1, 2); returns False where ggml aborts."""
    bs = 32 if kind == 0 else 16
    size = IQ2_XXS_SIZE if kind == 0 else (IQ2_XS_SIZE if kind == 1 else IQ2_S_SIZE)
    nsub = QK_K // bs
    scales = np.zeros(nsub, np.float32)
    weight = np.zeros(bs, np.float32)
    waux = np.zeros(bs, np.float32)
    xval = np.zeros(bs, np.float32)
    L = np.zeros(bs, np.int8)
    Laux = np.zeros(bs, np.int8)
    Lqp = np.zeros(bs, np.uint8)
    on_grid = np.zeros(bs // 8, np.bool_)
    on_grid_aux = np.zeros(bs // 8, np.bool_)
    block_signs = np.zeros(bs // 8, np.int64)
    q2 = np.zeros(2 * nsub, np.int64)  # XXS: uint32 words; XS: uint16 words
    for ibl in range(x.shape[0] // QK_K):
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        yb = y[size * ibl:size * (ibl + 1)]
        yb[:] = 0
        q2[:] = 0
        max_scale = f32(0.0)
        sumx2 = f32(0.0)
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = sumx2 / f32(QK_K) if kind < 2 else f32(2.0) * sumx2 / f32(QK_K)
        for ib in range(nsub):
            xb = xbl[bs * ib:bs * ib + bs]
            if qw.shape[0] > 0:
                qwb = qw[QK_K * ibl + bs * ib:QK_K * ibl + bs * ib + bs]
                for i in range(bs):
                    weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
            else:  # IQ2_S only (the others require an imatrix)
                for i in range(bs):
                    weight[i] = f32(0.25) * sigma2 + xb[i] * xb[i]
            for i in range(bs):
                waux[i] = np.sqrt(weight[i])
            _signs(xb, weight, xval, bs, kind < 2, block_signs)
            mx = xval[0]
            for i in range(1, bs):
                mx = mx if mx > xval[i] else xval[i]
            L[:] = 0
            if mx < (GROUP_MAX_EPS_IQ2_S if kind == 2 else GROUP_MAX_EPS):
                scales[ib] = f32(0.0)
                continue
            if kind == 0:
                scale = make_qp_quants(32, KMAXQ + 1, xval, Lqp, weight)
                for i in range(32):
                    L[i] = Lqp[i]
                eff_max = scale * f32(KMAXQ)
                if eff_max <= f32(0.0):
                    scales[ib] = f32(0.0)
                    L[:] = 0
                    continue
                scale, ok = _search(32, 6, eff_max, scale, xval, weight, waux, L, Laux, on_grid, on_grid_aux,
                                    gv, lv, kmap, nb, True)
            else:
                scale, ok = _search(16, 9, mx, mx / f32(2 * KMAXQ - 1), xval, weight, waux, L, Laux, on_grid,
                                    on_grid_aux, gv, lv, kmap, nb, False)
            if not ok:
                return False
            if scale < f32(0.0):
                scale = -scale
                for k in range(bs // 8):
                    block_signs[k] = (~block_signs[k]) & (127 if kind < 2 else 255)
            for k in range(bs // 8):
                gi = _grid_index(L, k, kmap)
                if gi < 0:
                    return False
                if kind == 0:
                    q2[2 * ib] |= gi << (8 * k)
                    q2[2 * ib + 1] |= block_signs[k] << (7 * k)
                elif kind == 1:
                    q2[2 * ib + k] = gi | (block_signs[k] << 9)
                else:
                    i8 = 2 * ib + k
                    yb[2 + i8] = gi & 255
                    yb[66 + i8 // 4] |= (gi >> 8) << (2 * (i8 % 4))
                    yb[2 + QK_K // 8 + i8] = block_signs[k]
            if not scale >= f32(0.0):
                return False
            scales[ib] = scale
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            continue  # y was zeroed: d = 0 and (XXS, XS) qs = 0, (S) what ggml wrote so far
        d = max_scale / f32(31.0)
        put_fp16(yb, 0, d * f32(0.9875) if kind == 2 else d)
        id_ = f32(1.0) / d
        for ib in range(nsub):
            l = nearest_int(f32(0.5) * (id_ * scales[ib] - f32(1.0)))
            l = max(0, min(15, l))
            if kind == 0:
                q2[2 * ib + 1] |= (l << 28) & 0xFFFFFFFF
            elif ib % 2 == 0:
                yb[size - 8 + ib // 2] = l
            else:
                yb[size - 8 + ib // 2] |= l << 4
        if kind == 0:
            for j in range(2 * nsub):
                for b in range(4):
                    yb[2 + 4 * j + b] = (q2[j] >> (8 * b)) & 0xFF
        elif kind == 1:
            for j in range(2 * nsub):
                yb[2 + 2 * j] = q2[j] & 0xFF
                yb[3 + 2 * j] = (q2[j] >> 8) & 0xFF
    return True


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq2_xxs(x, qw, out, ok, grid, kmap, nb, gv, lv):
    for r in prange(x.shape[0]):
        ok[r] = _iq2_row(x[r], out[r], qw, kmap, nb, gv, lv, 0)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq2_xs(x, qw, out, ok, grid, kmap, nb, gv, lv):
    for r in prange(x.shape[0]):
        ok[r] = _iq2_row(x[r], out[r], qw, kmap, nb, gv, lv, 1)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq2_s(x, qw, out, ok, grid, kmap, nb, gv, lv):
    for r in prange(x.shape[0]):
        ok[r] = _iq2_row(x[r], out[r], qw, kmap, nb, gv, lv, 2)


# ----------------------------------------------------------------------------------------------- dequantize


@njit(cache=True, error_model="numpy")
def _put8(y, o, db, dgrid, g, signs):
    for j in range(8):
        y[o + j] = db * f32(dgrid[g, j]) * (f32(-1.0) if signs & KMASK[j] else f32(1.0))


@njit(cache=True, error_model="numpy")
def _iq2_deq_row(b, y, dgrid, kind):
    size = IQ2_XXS_SIZE if kind == 0 else (IQ2_XS_SIZE if kind == 1 else IQ2_S_SIZE)
    for i in range(y.shape[0] // QK_K):
        blk = b[size * i:size * (i + 1)]
        d = get_fp16(blk, 0)
        o = QK_K * i
        for ib32 in range(QK_K // 32):
            if kind == 0:
                a = 2 + 8 * ib32
                aux1 = (np.int64(blk[a + 4]) | (np.int64(blk[a + 5]) << 8) | (np.int64(blk[a + 6]) << 16)
                        | (np.int64(blk[a + 7]) << 24))
                db = d * (f32(0.5) + f32(aux1 >> 28)) * f32(0.25)
                for l in range(4):
                    _put8(y, o, db, dgrid, np.int64(blk[a + l]), KSIGNS[(aux1 >> (7 * l)) & 127])
                    o += 8
            else:
                sc = np.int64(blk[size - 8 + ib32])
                db0 = d * (f32(0.5) + f32(sc & 0xF)) * f32(0.25)
                db1 = d * (f32(0.5) + f32(sc >> 4)) * f32(0.25)
                for l in range(4):
                    dl = db0 if l < 2 else db1
                    if kind == 1:
                        q = np.int64(blk[2 + 2 * (4 * ib32 + l)]) | (np.int64(blk[3 + 2 * (4 * ib32 + l)]) << 8)
                        _put8(y, o, dl, dgrid, q & 511, KSIGNS[q >> 9])
                    else:
                        qh = np.int64(blk[66 + ib32])
                        g = np.int64(blk[2 + 4 * ib32 + l]) | ((qh << (8 - 2 * l)) & 0x300)
                        _put8(y, o, dl, dgrid, g, np.int64(blk[2 + QK_K // 8 + 4 * ib32 + l]))
                    o += 8


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_iq2(raw, out, dgrid, kind):
    for r in prange(raw.shape[0]):
        _iq2_deq_row(raw[r], out[r], dgrid, kind)


_IQ2_VALUES = np.array([0x08, 0x19, 0x2B], np.int64)  # ggml-common.h's iq2*_grid bytes per level l
_KINDS = {"IQ2_XXS": (0, IQ2_XXS_SIZE, _quantize_iq2_xxs), "IQ2_XS": (1, IQ2_XS_SIZE, _quantize_iq2_xs),
          "IQ2_S": (2, IQ2_S_SIZE, _quantize_iq2_s)}


def dequant_grid(qtype: str) -> np.ndarray:
    """ggml-common.h's iq2xxs_grid / iq2xs_grid / iq2s_grid as (points, 8) bytes, derived from the quantizer grid."""
    return _IQ2_VALUES[(tables(qtype).grid.astype(np.int64) - 1) // 2].astype(np.uint8)


def _make(qtype: str):
    kind, size, drv = _KINDS[qtype]

    def quantize(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """Quantize float32 (rows, cols) to `qtype` blocks exactly as ggml_quantize_chunk does."""
        return run_quantize(qtype, drv, size, x, imatrix, value_grid(qtype))

    def dequantize(raw: np.ndarray, cols: int) -> np.ndarray:
        """Decode `qtype` blocks (rows, row_bytes) to float32 (rows, cols), as dequantize_row_* does."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty((raw.shape[0], cols), dtype=np.float32)
        _dequantize_iq2(raw, out, dequant_grid(qtype), kind)
        return out

    quantize.__name__ = f"quantize_{qtype.lower()}"
    dequantize.__name__ = f"dequantize_{qtype.lower()}"
    return quantize, dequantize


KERNELS = {name: _make(name) for name in _KINDS}
