"""IQ1_S and IQ1_M kernels: literal numba ports of ggml-quants.c's quantize_row_iq1_s_impl / iq1_m_impl and
dequantize_row_iq1_s / _m, bit-exact with ggml.

Each sub-block (32 weights for IQ1_S, 16 for IQ1_M) is split exhaustively into three groups {-1, 0, +1} (+-delta)
over its weights sorted by value, then every 8 are snapped to the 2048-point grid (tables from
quant.kernels.iq_tables). ggml sorts with qsort and a value-only comparator; glibc's qsort is a stable merge sort
for such small arrays, so equal values keep their index order: the insertion sort here is stable too.
IQ1_S requires an importance matrix (ggml_quantize_requires_imatrix); IQ1_M does not (ggml's check has it
commented out). Where ggml would abort (GGML_ASSERT) the driver reports it and QuantizationError is raised.
"""
# ruff: noqa: PLR1730  -- C's `if (a > b) b = a` kept literally: min()/max() differ on NaN/-0.0
from __future__ import annotations

import functools

import numpy as np
from numba import njit, prange

from quant.kernels.common import fp16_bits_to_fp32, fp32_to_fp16_bits, get_fp16, nearest_int, put_fp16
from quant.kernels.iq_tables import FLT_MAX, best_neighbour8, run_quantize, tables

f32 = np.float32
QK_K = 256
IQ1_S_SIZE = 50  # d qs[32] qh[8 x u16]
IQ1_M_SIZE = 56  # qs[32] qh[16] scales[8]
GROUP_MAX_EPS_IQ1_S = np.float32(1e-12)
GROUP_MAX_EPS_IQ1_M = np.float32(1e-7)
DELTA = np.float32(0.125)  # IQ1S_DELTA == IQ1M_DELTA
X_P = np.array([f32(-1.0) + DELTA, DELTA, f32(1.0) + DELTA], np.float32)
X_M = np.array([f32(-1.0) - DELTA, -DELTA, f32(1.0) - DELTA], np.float32)
MASKS = np.array([0x00, 0x80, 0x08, 0x88], np.int64)


@njit(cache=True, error_model="numpy")
def _sort_idx(xb, n, idx):
    """Indices of xb[:n] in ascending value order, ties in index order (glibc's stable qsort)."""
    for j in range(n):
        idx[j] = j
    for j in range(1, n):
        v = idx[j]
        k = j - 1
        while k >= 0 and xb[idx[k]] > xb[v]:
            idx[k + 1] = idx[k]
            k -= 1
        idx[k + 1] = v


@njit(cache=True, error_model="numpy")
def _iq1_s_row(x, y, qw, grid, kmap, nb, gvp, gvm, lv):
    bs = 32
    scales = np.zeros(QK_K // bs, np.float32)
    weight = np.zeros(bs, np.float32)
    sumx = np.zeros(bs + 1, np.float32)
    sumw = np.zeros(bs + 1, np.float32)
    idx = np.zeros(bs, np.int64)
    L = np.zeros(bs, np.int8)
    index = np.zeros(bs // 8, np.int64)
    shifts = np.zeros(QK_K // bs, np.int64)
    for ibl in range(x.shape[0] // QK_K):
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        yb = y[IQ1_S_SIZE * ibl:IQ1_S_SIZE * (ibl + 1)]
        yb[:] = 0
        max_scale = f32(0.0)
        sumx2 = f32(0.0)
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = f32(2.0) * sumx2 / f32(QK_K)
        for ib in range(QK_K // bs):
            xb = xbl[bs * ib:bs * ib + bs]
            qwb = qw[QK_K * ibl + bs * ib:QK_K * ibl + bs * ib + bs]
            for i in range(bs):
                weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
            mx = abs(xb[0])
            for i in range(1, bs):
                mx = mx if mx > abs(xb[i]) else abs(xb[i])
            if mx < GROUP_MAX_EPS_IQ1_S:
                scales[ib] = f32(0.0)
                shifts[ib] = 1
                L[:] = 1
                continue
            _sort_idx(xb, bs, idx)
            sumx[0] = f32(0.0)
            sumw[0] = f32(0.0)
            for j in range(bs):
                i = idx[j]
                sumx[j + 1] = sumx[j] + weight[i] * xb[i]
                sumw[j + 1] = sumw[j] + weight[i]
            best_score = -FLT_MAX
            scale = mx
            besti1 = -1
            besti2 = -1
            best_shift = 0
            for i1 in range(bs + 1):
                for i2 in range(i1, bs + 1):
                    sumqx = ((sumx[i1] - sumx[0]) * X_P[0] + (sumx[i2] - sumx[i1]) * X_P[1]
                             + (sumx[bs] - sumx[i2]) * X_P[2])
                    sumq2 = ((sumw[i1] - sumw[0]) * X_P[0] * X_P[0] + (sumw[i2] - sumw[i1]) * X_P[1] * X_P[1]
                             + (sumw[bs] - sumw[i2]) * X_P[2] * X_P[2])
                    if sumq2 > f32(0.0) and sumqx * sumqx > best_score * sumq2:
                        scale = sumqx / sumq2
                        best_score = scale * sumqx
                        besti1 = i1
                        besti2 = i2
                        best_shift = 1
                    sumqx = ((sumx[i1] - sumx[0]) * X_M[0] + (sumx[i2] - sumx[i1]) * X_M[1]
                             + (sumx[bs] - sumx[i2]) * X_M[2])
                    sumq2 = ((sumw[i1] - sumw[0]) * X_M[0] * X_M[0] + (sumw[i2] - sumw[i1]) * X_M[1] * X_M[1]
                             + (sumw[bs] - sumw[i2]) * X_M[2] * X_M[2])
                    if sumq2 > f32(0.0) and sumqx * sumqx > best_score * sumq2:
                        scale = sumqx / sumq2
                        best_score = scale * sumqx
                        besti1 = i1
                        besti2 = i2
                        best_shift = -1
            if besti1 < 0 or besti2 < 0 or best_shift == 0:
                scales[ib] = f32(0.0)
                shifts[ib] = 1
                L[:] = 1
                continue
            for j in range(0, besti1):
                L[idx[j]] = 0
            for j in range(besti1, besti2):
                L[idx[j]] = 1
            for j in range(besti2, bs):
                L[idx[j]] = 2
            if scale < f32(0.0):
                for j in range(bs):
                    L[j] = 2 - L[j]
                scale = -scale
                best_shift = -best_shift
            all_on_grid = True
            xx = X_P if best_shift == 1 else X_M
            gv = gvp if best_shift == 1 else gvm
            for k in range(bs // 8):
                u = 0
                for j in range(8):
                    u |= np.int64(L[8 * k + j]) << (2 * j)
                gi = kmap[u]
                if gi < 0:
                    all_on_grid = False
                    gi = best_neighbour8(nb, -gi - 1, gv, xb, weight, scale, 8 * k)
                    if gi < 0:
                        return False
                    for j in range(8):
                        L[8 * k + j] = lv[gi, j]
                index[k] = gi
            if not all_on_grid:
                sumqx = f32(0.0)
                sumq2 = f32(0.0)
                for k in range(bs // 8):
                    for j in range(8):
                        w = weight[8 * k + j]
                        q = xx[(np.int64(grid[index[k], j]) - 1) // 2]
                        sumqx += w * q * xb[8 * k + j]
                        sumq2 += w * q * q
                if sumqx > f32(0.0) and sumq2 > f32(0.0):
                    scale = sumqx / sumq2
            h = 0
            for k in range(bs // 8):
                yb[2 + (bs // 8) * ib + k] = index[k] & 255
                h |= (index[k] >> 8) << (3 * k)
            yb[34 + 2 * ib] = h & 0xFF
            yb[35 + 2 * ib] = (h >> 8) & 0xFF
            if not scale >= f32(0.0):
                return False
            scales[ib] = scale
            shifts[ib] = best_shift
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            continue
        d = max_scale / f32(15.0)
        put_fp16(yb, 0, d * f32(1.125))
        id_ = f32(1.0) / d
        for ib in range(QK_K // bs):
            l = nearest_int(f32(0.5) * (id_ * scales[ib] - f32(1.0)))
            l = max(0, min(7, l))
            if shifts[ib] == -1:
                l |= 8
            yb[35 + 2 * ib] |= (l << 4) & 0xFF  # qh[ib] |= l << 12 on the high byte
    return True


@njit(cache=True, error_model="numpy")
def _iq1_m_weights(xb, qwb, sigma2, bs, weight):
    if qwb.shape[0] > 0:
        for i in range(bs):
            weight[i] = qwb[i] * np.sqrt(sigma2 + xb[i] * xb[i])
    else:
        for i in range(bs):
            weight[i] = xb[i] * xb[i]


@njit(cache=True, error_model="numpy")
def _iq1_m_row(x, y, qw, grid, kmap, nb, gvp, gvm, lv):
    bs = 16
    scales = np.zeros(QK_K // bs, np.float32)
    weight = np.zeros(bs, np.float32)
    idx = np.zeros(bs, np.int64)
    L = np.zeros(bs, np.int8)
    index = np.zeros(bs // 8, np.int64)
    shifts = np.zeros(QK_K // bs, np.int64)
    px0 = np.zeros(bs + 1, np.float32)
    px1 = np.zeros(bs + 1, np.float32)
    pw0 = np.zeros(bs + 1, np.float32)
    pw1 = np.zeros(bs + 1, np.float32)
    sc = np.zeros(4, np.int64)
    p2 = X_P[2]
    m2 = X_M[2]
    cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1]
    cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2]
    cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1]
    cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2]
    has_qw = qw.shape[0] > 0
    for ibl in range(x.shape[0] // QK_K):
        xbl = x[QK_K * ibl:QK_K * (ibl + 1)]
        yb = y[IQ1_M_SIZE * ibl:IQ1_M_SIZE * (ibl + 1)]
        yb[:] = 0
        max_scale = f32(0.0)
        sumx2 = f32(0.0)
        for i in range(QK_K):
            sumx2 += xbl[i] * xbl[i]
        sigma2 = f32(2.0) * sumx2 / f32(QK_K)
        for ib in range(QK_K // bs):
            xb = xbl[bs * ib:bs * ib + bs]
            qwb = qw[QK_K * ibl + bs * ib:QK_K * ibl + bs * ib + bs] if has_qw else qw
            _iq1_m_weights(xb, qwb, sigma2, bs, weight)
            mx = abs(xb[0])
            for i in range(1, bs):
                mx = mx if mx > abs(xb[i]) else abs(xb[i])
            if mx < GROUP_MAX_EPS_IQ1_M:
                scales[ib] = f32(0.0)
                shifts[ib] = 0
                L[:] = 1
                continue
            _sort_idx(xb, bs, idx)
            best_score = -FLT_MAX
            scale = mx
            besti1 = -1
            besti2 = -1
            best_k = -1
            # ggml's per-half prefix sums; its split search below with loop-invariant products hoisted and the
            # 2- and 4-element temporaries in scalars (every float op and its order as in C: same bits)
            px0[0] = f32(0.0)
            px1[0] = f32(0.0)
            pw0[0] = f32(0.0)
            pw1[0] = f32(0.0)
            for j in range(bs):
                i = idx[j]
                if i < bs // 2:
                    px0[j + 1] = px0[j] + weight[i] * xb[i]
                    px1[j + 1] = px1[j]
                    pw0[j + 1] = pw0[j] + weight[i]
                    pw1[j + 1] = pw1[j]
                else:
                    px1[j + 1] = px1[j] + weight[i] * xb[i]
                    px0[j + 1] = px0[j]
                    pw1[j + 1] = pw1[j] + weight[i]
                    pw0[j + 1] = pw0[j]
            tx0p = px0[bs] * p2
            tx0m = px0[bs] * m2
            tx1p = px1[bs] * p2
            tx1m = px1[bs] * m2
            tw0p = pw0[bs] * p2 * p2
            tw0m = pw0[bs] * m2 * m2
            tw1p = pw1[bs] * p2 * p2
            tw1m = pw1[bs] * m2 * m2
            for i1 in range(bs + 1):
                ax0 = px0[i1]
                ax1 = px1[i1]
                a0p = tw0p + pw0[i1] * cp1
                a0m = tw0m + pw0[i1] * cm1
                a1p = tw1p + pw1[i1] * cp1
                a1m = tw1m + pw1[i1] * cm1
                for i2 in range(i1, bs + 1):
                    sx0 = ax0 + px0[i2]
                    sx1 = ax1 + px1[i2]
                    qxp0 = tx0p - sx0
                    qxm0 = tx0m - sx0
                    qxp1 = tx1p - sx1
                    qxm1 = tx1m - sx1
                    q2p0 = a0p + pw0[i2] * cp2
                    q2m0 = a0m + pw0[i2] * cm2
                    q2p1 = a1p + pw1[i2] * cp2
                    q2m1 = a1m + pw1[i2] * cm2
                    sqx = qxp0 + qxp1
                    sq2 = q2p0 + q2p1
                    if sq2 > f32(0.0) and sqx * sqx > best_score * sq2:
                        scale = sqx / sq2
                        best_score = scale * sqx
                        besti1 = i1
                        besti2 = i2
                        best_k = 0
                    sqx = qxp0 + qxm1
                    sq2 = q2p0 + q2m1
                    if sq2 > f32(0.0) and sqx * sqx > best_score * sq2:
                        scale = sqx / sq2
                        best_score = scale * sqx
                        besti1 = i1
                        besti2 = i2
                        best_k = 1
                    sqx = qxm0 + qxp1
                    sq2 = q2m0 + q2p1
                    if sq2 > f32(0.0) and sqx * sqx > best_score * sq2:
                        scale = sqx / sq2
                        best_score = scale * sqx
                        besti1 = i1
                        besti2 = i2
                        best_k = 2
                    sqx = qxm0 + qxm1
                    sq2 = q2m0 + q2m1
                    if sq2 > f32(0.0) and sqx * sqx > best_score * sq2:
                        scale = sqx / sq2
                        best_score = scale * sqx
                        besti1 = i1
                        besti2 = i2
                        best_k = 3
            if besti1 < 0 or besti2 < 0 or best_k < 0:
                scales[ib] = f32(0.0)
                shifts[ib] = 0
                L[:] = 1
                continue
            for j in range(0, besti1):
                L[idx[j]] = 0
            for j in range(besti1, besti2):
                L[idx[j]] = 1
            for j in range(besti2, bs):
                L[idx[j]] = 2
            if scale < f32(0.0):
                for j in range(bs):
                    L[j] = 2 - L[j]
                scale = -scale
                best_k = 3 - best_k  # ggml: 0<->3, 1<->2
            all_on_grid = True
            for k in range(bs // 8):
                if k == 0:
                    gv = gvp if best_k < 2 else gvm
                else:
                    gv = gvp if best_k % 2 == 0 else gvm
                u = 0
                for j in range(8):
                    u |= np.int64(L[8 * k + j]) << (2 * j)
                gi = kmap[u]
                if gi < 0:
                    all_on_grid = False
                    gi = best_neighbour8(nb, -gi - 1, gv, xb, weight, scale, 8 * k)
                    if gi < 0:
                        return False
                    for j in range(8):
                        L[8 * k + j] = lv[gi, j]
                index[k] = gi
            if not all_on_grid:
                sqx = f32(0.0)
                sq2 = f32(0.0)
                for k in range(bs // 8):
                    if k == 0:
                        xx = X_P if best_k < 2 else X_M
                    else:
                        xx = X_P if best_k % 2 == 0 else X_M
                    for j in range(8):
                        w = weight[8 * k + j]
                        q = xx[(np.int64(grid[index[k], j]) - 1) // 2]
                        sqx += w * q * xb[8 * k + j]
                        sq2 += w * q * q
                if sqx > f32(0.0) and sq2 > f32(0.0):
                    scale = sqx / sq2
            yb[2 * ib] = index[0] & 255
            yb[2 * ib + 1] = index[1] & 255
            yb[32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
            if not scale >= f32(0.0):
                return False
            scales[ib] = scale
            shifts[ib] = best_k
            max_scale = max_scale if max_scale > scale else scale
        if not max_scale:
            continue
        sc[:] = 0
        d = max_scale / f32(15.0)
        id_ = f32(1.0) / d
        sqx = f32(0.0)
        sq2 = f32(0.0)
        for ib in range(QK_K // bs):
            l = nearest_int(f32(0.5) * (id_ * scales[ib] - f32(1.0)))
            l = max(0, min(7, l))
            sc[ib // 4] |= l << (3 * (ib % 4))
            yb[32 + ib] |= MASKS[shifts[ib]]
            xb = xbl[bs * ib:bs * ib + bs]
            qwb = qw[QK_K * ibl + bs * ib:QK_K * ibl + bs * ib + bs] if has_qw else qw
            _iq1_m_weights(xb, qwb, sigma2, bs, weight)
            for k in range(bs // 8):
                if k == 0:
                    xx = X_P if shifts[ib] < 2 else X_M
                else:
                    xx = X_P if shifts[ib] % 2 == 0 else X_M
                g = np.int64(yb[2 * ib + k]) + ((np.int64(yb[32 + ib]) << (8 - 4 * k)) & 0x700)
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[(np.int64(grid[g, j]) - 1) // 2] * f32(2 * l + 1)
                    sqx += w * q * xb[8 * k + j]
                    sq2 += w * q * q
        if sq2 > f32(0.0):
            d = sqx / sq2
        s = np.int64(fp32_to_fp16_bits(d * f32(1.1125)))
        sc[0] |= (s & 0x000F) << 12
        sc[1] |= (s & 0x00F0) << 8
        sc[2] |= (s & 0x0F00) << 4
        sc[3] |= (s & 0xF000) << 0
        for j in range(4):
            yb[48 + 2 * j] = sc[j] & 0xFF
            yb[49 + 2 * j] = (sc[j] >> 8) & 0xFF
    return True


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq1_s(x, qw, out, ok, grid, kmap, nb, gvp, gvm, lv):
    for r in prange(x.shape[0]):
        ok[r] = _iq1_s_row(x[r], out[r], qw, grid, kmap, nb, gvp, gvm, lv)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_iq1_m(x, qw, out, ok, grid, kmap, nb, gvp, gvm, lv):
    for r in prange(x.shape[0]):
        ok[r] = _iq1_m_row(x[r], out[r], qw, grid, kmap, nb, gvp, gvm, lv)


# ----------------------------------------------------------------------------------------------- dequantize


@njit(cache=True, error_model="numpy")
def _iq1_s_deq_row(b, y, dgrid):
    for i in range(y.shape[0] // QK_K):
        blk = b[IQ1_S_SIZE * i:IQ1_S_SIZE * (i + 1)]
        d = get_fp16(blk, 0)
        o = QK_K * i
        for ib in range(QK_K // 32):
            qh = np.int64(blk[34 + 2 * ib]) | (np.int64(blk[35 + 2 * ib]) << 8)
            dl = d * f32(2 * ((qh >> 12) & 7) + 1)
            delta = -DELTA if qh & 0x8000 else DELTA
            for l in range(4):
                g = np.int64(blk[2 + 4 * ib + l]) | (((qh >> (3 * l)) & 7) << 8)
                for j in range(8):
                    y[o + j] = dl * (f32(dgrid[g, j]) + delta)
                o += 8


@njit(cache=True, error_model="numpy")
def _iq1_m_deq_row(b, y, dgrid):
    for i in range(y.shape[0] // QK_K):
        blk = b[IQ1_M_SIZE * i:IQ1_M_SIZE * (i + 1)]
        sc0 = np.int64(blk[48]) | (np.int64(blk[49]) << 8)
        sc1 = np.int64(blk[50]) | (np.int64(blk[51]) << 8)
        sc2 = np.int64(blk[52]) | (np.int64(blk[53]) << 8)
        sc3 = np.int64(blk[54]) | (np.int64(blk[55]) << 8)
        u16 = (sc0 >> 12) | ((sc1 >> 8) & 0x00F0) | ((sc2 >> 4) & 0x0F00) | (sc3 & 0xF000)
        d = fp16_bits_to_fp32(u16)
        o = QK_K * i
        for ib in range(QK_K // 32):
            s = np.int64(blk[48 + 2 * (ib // 2)]) | (np.int64(blk[49 + 2 * (ib // 2)]) << 8)
            dl1 = d * f32(2 * ((s >> (6 * (ib % 2) + 0)) & 0x7) + 1)
            dl2 = d * f32(2 * ((s >> (6 * (ib % 2) + 3)) & 0x7) + 1)
            qh0 = np.int64(blk[32 + 2 * ib])
            qh1 = np.int64(blk[33 + 2 * ib])
            qs = 4 * ib
            for l in range(4):
                qh = qh0 if l < 2 else qh1
                g = np.int64(blk[qs + l]) | ((qh << (8 if l % 2 == 0 else 4)) & 0x700)
                bit = 0x08 if l % 2 == 0 else 0x80
                delta = -DELTA if qh & bit else DELTA
                dl = dl1 if l < 2 else dl2
                for j in range(8):
                    y[o + j] = dl * (f32(dgrid[g, j]) + delta)
                o += 8


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_iq1_s(raw, out, dgrid):
    for r in prange(raw.shape[0]):
        _iq1_s_deq_row(raw[r], out[r], dgrid)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_iq1_m(raw, out, dgrid):
    for r in prange(raw.shape[0]):
        _iq1_m_deq_row(raw[r], out[r], dgrid)


def dequant_grid() -> np.ndarray:
    """ggml-common.h's iq1s_grid as (2048, 8) int8 values -1/0/+1, derived from the quantizer grid."""
    return ((tables("IQ1_S").grid.astype(np.int64) - 1) // 2 - 1).astype(np.int8)


# iq1_find_best_neighbour2 is iq_tables.best_neighbour8 on these value grids; where no listed neighbour scores below
# FLT_MAX (non-finite weights) ggml's full-grid fallback reads past xval (undefined behaviour) and then asserts: the
# row drivers report that as an abort.
@functools.cache
def value_grids() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x_p[level], x_m[level], level) per grid point and coordinate: the float32 values ggml's
    iq1_find_best_neighbour2 looks up per use (xg[(pg[i]-1)/2]), tabled once, and the levels (pg[i]-1)/2."""
    lv = ((tables("IQ1_S").grid.astype(np.int64) - 1) // 2).astype(np.int8)
    return np.ascontiguousarray(X_P[lv]), np.ascontiguousarray(X_M[lv]), lv


_KINDS = {"IQ1_S": (IQ1_S_SIZE, _quantize_iq1_s, _dequantize_iq1_s),
          "IQ1_M": (IQ1_M_SIZE, _quantize_iq1_m, _dequantize_iq1_m)}


def _make(qtype: str):
    size, qdrv, ddrv = _KINDS[qtype]

    def quantize(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """Quantize float32 (rows, cols) to `qtype` blocks exactly as ggml_quantize_chunk does."""
        return run_quantize(qtype, qdrv, size, x, imatrix, value_grids())

    def dequantize(raw: np.ndarray, cols: int) -> np.ndarray:
        """Decode `qtype` blocks (rows, row_bytes) to float32 (rows, cols), as dequantize_row_* does."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty((raw.shape[0], cols), dtype=np.float32)
        ddrv(raw, out, dequant_grid())
        return out

    quantize.__name__ = f"quantize_{qtype.lower()}"
    dequantize.__name__ = f"dequantize_{qtype.lower()}"
    return quantize, dequantize


KERNELS = {name: _make(name) for name in _KINDS}
