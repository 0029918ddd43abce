"""K-quant kernels (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K): literal numba ports of ggml-quants.c, bit-exact with ggml.

quantize: without an imatrix ggml_quantize_chunk runs quantize_row_qN_K_ref, with one quantize_row_qN_K_impl
(per row, the same per-column weights every row); both are ported here. Blocks are written in ggml-common.h's
struct order. dequantize ports dequantize_row_qN_K. Rows run in parallel (prange); results do not depend on it.
"""
# ruff: noqa: PLR1730  -- C's `if (a > b) b = a` kept literally: min()/max() differ on NaN/-0.0
from __future__ import annotations

import numpy as np
from numba import njit, prange

from quant.kernels.common import f32_as_i32, get_fp16, nearest_int, put_fp16, to_i8, to_u8
from quant.kernels.search import (
    GROUP_MAX_EPS,
    make_q3_quants,
    make_qkx2_quants,
    make_qkx3_quants,
    make_qp_quants,
    make_qx_quants,
)

f32 = np.float32
QK_K = 256

# bytes per super-block (ggml-common.h)
Q2_K_SIZE = 84  # scales[16] qs[64] d dmin
Q3_K_SIZE = 110  # hmask[32] qs[64] scales[12] d
Q4_K_SIZE = 144  # d dmin scales[12] qs[128]
Q5_K_SIZE = 176  # d dmin scales[12] qh[32] qs[128]
Q6_K_SIZE = 210  # ql[128] qh[64] scales[16] d

# ----------------------------------------------------------------------------------------------- shared packing


@njit(cache=True, error_model="numpy")
def _get_scale_min_k4(j, q):
    """ggml's get_scale_min_k4 on the 12 packed scale bytes q: the 6-bit (scale, min) of sub-block j."""
    if j < 4:
        d = np.int64(q[j]) & 63
        m = np.int64(q[j + 4]) & 63
    else:
        d = (np.int64(q[j + 4]) & 0xF) | ((np.int64(q[j - 4]) >> 6) << 4)
        m = (np.int64(q[j + 4]) >> 4) | ((np.int64(q[j - 0]) >> 6) << 4)
    return d, m


@njit(cache=True, error_model="numpy")
def _pack_scale_min_k4(sc, j, ls, lm):
    """Store the 6-bit (ls, lm) of sub-block j into the 12 scale bytes sc, in ggml's order of writes."""
    if j < 4:
        sc[j] = to_u8(ls)
        sc[j + 4] = to_u8(lm)
    else:
        sc[j + 4] = to_u8((ls & 0xF) | ((lm & 0xF) << 4))
        sc[j - 4] = to_u8(np.int64(sc[j - 4]) | ((ls >> 4) << 6))
        sc[j - 0] = to_u8(np.int64(sc[j - 0]) | ((lm >> 4) << 6))


@njit(cache=True, error_model="numpy")
def _requant_k4(x, y, L, nsub, lmax):
    """Q4_K/Q5_K second pass: requantize every sub-block of 32 against the fp16-rounded d/dmin and 6-bit scales."""
    sc = y[4:16]
    for j in range(nsub):
        s, m = _get_scale_min_k4(j, sc)
        d = get_fp16(y, 0) * f32(s)
        if d == f32(0.0):
            continue
        dm = get_fp16(y, 2) * f32(m)
        for ii in range(32):
            l = nearest_int((x[32 * j + ii] + dm) / d)
            L[32 * j + ii] = max(0, min(lmax, l))


@njit(cache=True, error_model="numpy")
def _pack_2bit(L, qs):
    """Pack 256 2-bit levels as ggml does for Q2_K/Q3_K qs (4 planes of 32, 128 values per 32 bytes)."""
    for j in range(0, QK_K, 128):
        for l in range(32):
            qs[j // 4 + l] = to_u8(
                np.int64(L[j + l])
                | (np.int64(L[j + l + 32]) << 2)
                | (np.int64(L[j + l + 64]) << 4)
                | (np.int64(L[j + l + 96]) << 6)
            )


# ----------------------------------------------------------------------------------------------- Q2_K


@njit(cache=True, error_model="numpy")
def _q2k_requant_pack(x, y, L, dm, mm):
    for j in range(QK_K // 16):
        d = dm * f32(y[j] & 0xF)
        if d == f32(0.0):
            continue
        m = mm * f32(y[j] >> 4)
        for ii in range(16):
            l = nearest_int((x[16 * j + ii] + m) / d)
            L[16 * j + ii] = max(0, min(3, l))
    _pack_2bit(L, y[16:80])


@njit(cache=True, error_model="numpy")
def _q2k_block_ref(x, y, L, Laux, weights, mins, scales):
    q4scale = f32(15.0)
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(QK_K // 16):
        for l in range(16):
            weights[l] = abs(x[16 * j + l])
        sc, mn = make_qkx2_quants(16, 3, x[16 * j:16 * j + 16], weights, L[16 * j:16 * j + 16], Laux,
                                  -0.5, 0.1, 15, True)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    if max_scale > f32(0.0):
        iscale = q4scale / max_scale
        for j in range(QK_K // 16):
            y[j] = to_u8(nearest_int(iscale * scales[j]))
        put_fp16(y, 80, max_scale / q4scale)
    else:
        for j in range(QK_K // 16):
            y[j] = 0
        put_fp16(y, 80, f32(0.0))
    if max_min > f32(0.0):
        iscale = q4scale / max_min
        for j in range(QK_K // 16):
            l = nearest_int(iscale * mins[j])
            y[j] = to_u8(np.int64(y[j]) | (l << 4))
        put_fp16(y, 82, max_min / q4scale)
    else:
        put_fp16(y, 82, f32(0.0))
    _q2k_requant_pack(x, y, L, get_fp16(y, 80), get_fp16(y, 82))


@njit(cache=True, error_model="numpy")
def _q2k_block_impl(x, y, qw, L, Laux, weight, mins, scales, sw, Ls, Lm):
    for j in range(QK_K // 16):
        sw[j] = f32(0.0)
    sumx2 = f32(0.0)
    for j in range(QK_K):
        sumx2 += x[j] * x[j]
    sigma2 = sumx2 / f32(QK_K)
    for j in range(QK_K // 16):
        for l in range(16):
            weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
        for l in range(QK_K // 16):
            sw[j] += weight[l]
        sc, mn = make_qkx3_quants(16, 3, x[16 * j:16 * j + 16], weight, L[16 * j:16 * j + 16], Laux,
                                  -0.9, 0.05, 36, False)
        scales[j] = sc
        mins[j] = mn
    dm = make_qp_quants(QK_K // 16, 15, scales, Ls, sw)
    mm = make_qp_quants(QK_K // 16, 15, mins, Lm, sw)
    put_fp16(y, 80, dm)
    put_fp16(y, 82, mm)
    for j in range(QK_K // 16):
        y[j] = to_u8(np.int64(Ls[j]) | (np.int64(Lm[j]) << 4))
    _q2k_requant_pack(x, y, L, get_fp16(y, 80), get_fp16(y, 82))


@njit(cache=True, error_model="numpy")
def _q2k_row(x, y, qw):
    L = np.zeros(QK_K, np.uint8)
    Laux = np.zeros(16, np.uint8)
    weights = np.zeros(16, np.float32)
    mins = np.zeros(QK_K // 16, np.float32)
    scales = np.zeros(QK_K // 16, np.float32)
    sw = np.zeros(QK_K // 16, np.float32)
    Ls = np.zeros(QK_K // 16, np.uint8)
    Lm = np.zeros(QK_K // 16, np.uint8)
    for i in range(x.shape[0] // QK_K):
        xb = x[QK_K * i:QK_K * (i + 1)]
        yb = y[Q2_K_SIZE * i:Q2_K_SIZE * (i + 1)]
        if qw.shape[0] == 0:
            _q2k_block_ref(xb, yb, L, Laux, weights, mins, scales)
        else:
            _q2k_block_impl(xb, yb, qw[QK_K * i:QK_K * (i + 1)], L, Laux, weights, mins, scales, sw, Ls, Lm)


@njit(cache=True, error_model="numpy")
def _q2k_deq_row(b, y):
    for i in range(y.shape[0] // QK_K):
        blk = b[Q2_K_SIZE * i:Q2_K_SIZE * (i + 1)]
        d = get_fp16(blk, 80)
        mn = get_fp16(blk, 82)
        o = QK_K * i
        is_ = 0
        for n in range(0, QK_K, 128):
            q = 16 + n // 4
            shift = 0
            for j in range(4):
                sc = np.int64(blk[is_])
                is_ += 1
                dl = d * f32(sc & 0xF)
                ml = mn * f32(sc >> 4)
                for l in range(16):
                    y[o] = dl * f32((np.int64(blk[q + l]) >> shift) & 3) - ml
                    o += 1
                sc = np.int64(blk[is_])
                is_ += 1
                dl = d * f32(sc & 0xF)
                ml = mn * f32(sc >> 4)
                for l in range(16):
                    y[o] = dl * f32((np.int64(blk[q + l + 16]) >> shift) & 3) - ml
                    o += 1
                shift += 2


# ----------------------------------------------------------------------------------------------- Q3_K


@njit(cache=True, error_model="numpy")
def _q3k_put_scale(sc, j, l):
    """Q3_K 6-bit scale packing of level l (0..63) for sub-block j into the 12 bytes sc (ggml's order)."""
    if j < 8:
        sc[j] = to_u8(l & 0xF)
    else:
        sc[j - 8] = to_u8(np.int64(sc[j - 8]) | ((l & 0xF) << 4))
    l >>= 4
    sc[j % 4 + 8] = to_u8(np.int64(sc[j % 4 + 8]) | (l << (2 * (j // 4))))


@njit(cache=True, error_model="numpy")
def _q3k_get_scale(sc, j):
    """Signed 6-bit scale of sub-block j (C's int8_t sc arithmetic)."""
    if j < 8:
        s = to_i8(np.int64(sc[j]) & 0xF)
    else:
        s = to_i8(np.int64(sc[j - 8]) >> 4)
    return to_i8((s | (((np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32)


@njit(cache=True, error_model="numpy")
def _q3k_requant_pack(x, y, L):
    sc = y[96:108]
    for j in range(QK_K // 16):
        s = _q3k_get_scale(sc, j)
        d = get_fp16(y, 108) * f32(s)
        if d == f32(0.0):
            continue
        for ii in range(16):
            l = nearest_int(x[16 * j + ii] / d)
            L[16 * j + ii] = max(-4, min(3, l)) + 4
    for m in range(QK_K // 8):
        y[m] = 0
    m = 0
    hm = 1
    for j in range(QK_K):
        if L[j] > 3:
            y[m] = to_u8(np.int64(y[m]) | hm)
            L[j] -= 4
        m += 1
        if m == QK_K // 8:
            m = 0
            hm = (hm << 1) & 0xFF
    _pack_2bit(L, y[32:96])


@njit(cache=True, error_model="numpy")
def _q3k_block_ref(x, y, L, scales):
    max_scale = f32(0.0)
    amax = f32(0.0)
    for j in range(QK_K // 16):
        scales[j] = make_q3_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], True)
        scale = abs(scales[j])
        if scale > amax:
            amax = scale
            max_scale = scales[j]
    sc = y[96:108]
    for j in range(12):
        sc[j] = 0
    if max_scale != f32(0.0):
        iscale = f32(-32.0) / max_scale
        for j in range(QK_K // 16):
            l = to_i8(nearest_int(iscale * scales[j]))
            l = to_i8(max(-32, min(31, l)) + 32)
            _q3k_put_scale(sc, j, l)
        put_fp16(y, 108, f32(1.0) / iscale)
    else:
        put_fp16(y, 108, f32(0.0))
    _q3k_requant_pack(x, y, L)


@njit(cache=True, error_model="numpy")
def _q3k_block_impl(x, y, qw, L, scales, weight, sw, Ls):
    sumx2 = f32(0.0)
    for j in range(QK_K):
        sumx2 += x[j] * x[j]
    sigma2 = f32(2.0) * sumx2 / f32(QK_K)
    for j in range(QK_K // 16):
        if qw.shape[0] > 0:
            for l in range(16):
                weight[l] = qw[16 * j + l] * np.sqrt(sigma2 + x[16 * j + l] * x[16 * j + l])
        else:
            for l in range(16):
                weight[l] = x[16 * j + l] * x[16 * j + l]
        sumw = f32(0.0)
        for l in range(16):
            sumw += weight[l]
        sw[j] = sumw
        scales[j] = make_qx_quants(16, 4, x[16 * j:16 * j + 16], L[16 * j:16 * j + 16], 1, weight)
    sc = y[96:108]
    for j in range(12):
        sc[j] = 0
    d_block = make_qx_quants(QK_K // 16, 32, scales, Ls, 1, sw)
    for j in range(QK_K // 16):
        _q3k_put_scale(sc, j, np.int64(Ls[j]))
    put_fp16(y, 108, d_block)
    _q3k_requant_pack(x, y, L)


@njit(cache=True, error_model="numpy")
def _q3k_row(x, y, qw):
    L = np.zeros(QK_K, np.int8)
    scales = np.zeros(QK_K // 16, np.float32)
    weight = np.zeros(16, np.float32)
    sw = np.zeros(QK_K // 16, np.float32)
    Ls = np.zeros(QK_K // 16, np.int8)
    for i in range(x.shape[0] // QK_K):
        xb = x[QK_K * i:QK_K * (i + 1)]
        yb = y[Q3_K_SIZE * i:Q3_K_SIZE * (i + 1)]
        if qw.shape[0] == 0:
            _q3k_block_ref(xb, yb, L, scales)
        else:
            _q3k_block_impl(xb, yb, qw[QK_K * i:QK_K * (i + 1)], L, scales, weight, sw, Ls)


@njit(cache=True, error_model="numpy")
def _q3k_deq_row(b, y):
    for i in range(y.shape[0] // QK_K):
        blk = b[Q3_K_SIZE * i:Q3_K_SIZE * (i + 1)]
        d_all = get_fp16(blk, 108)
        sc = blk[96:108]
        o = QK_K * i
        m = 1
        is_ = 0
        for n in range(0, QK_K, 128):
            q = 32 + n // 4
            shift = 0
            for j in range(4):
                dl = d_all * f32(_q3k_get_scale(sc, is_))
                is_ += 1
                for l in range(16):
                    v = ((np.int64(blk[q + l]) >> shift) & 3) - (0 if (np.int64(blk[l]) & m) else 4)
                    y[o] = dl * f32(v)
                    o += 1
                dl = d_all * f32(_q3k_get_scale(sc, is_))
                is_ += 1
                for l in range(16):
                    v = ((np.int64(blk[q + l + 16]) >> shift) & 3) - (0 if (np.int64(blk[l + 16]) & m) else 4)
                    y[o] = dl * f32(v)
                    o += 1
                shift += 2
                m <<= 1


# ----------------------------------------------------------------------------------------------- Q4_K / Q5_K


@njit(cache=True, error_model="numpy")
def _k4_scales_ref(x, L, Laux, weights, mins, scales, nmax, rmin, rdelta, nstep):
    """First pass of Q4_K/Q5_K ref: per sub-block make_qkx2_quants with weights av_x + |x|; returns maxima."""
    max_scale = f32(0.0)
    max_min = f32(0.0)
    for j in range(QK_K // 32):
        sum_x2 = f32(0.0)
        for l in range(32):
            sum_x2 += x[32 * j + l] * x[32 * j + l]
        av_x = np.sqrt(sum_x2 / f32(32.0))
        for l in range(32):
            weights[l] = av_x + abs(x[32 * j + l])
        sc, mn = make_qkx2_quants(32, nmax, x[32 * j:32 * j + 32], weights, L[32 * j:32 * j + 32], Laux,
                                  rmin, rdelta, nstep, False)
        scales[j] = sc
        mins[j] = mn
        if sc > max_scale:
            max_scale = sc
        if mn > max_min:
            max_min = mn
    return max_scale, max_min


@njit(cache=True, error_model="numpy")
def _k4_header_ref(y, mins, scales, max_scale, max_min):
    """Q4_K/Q5_K ref: 6-bit scales/mins relative to the maxima, then d = max_scale/63, dmin = max_min/63."""
    inv_scale = f32(63.0) / max_scale if max_scale > f32(0.0) else f32(0.0)
    inv_min = f32(63.0) / max_min if max_min > f32(0.0) else f32(0.0)
    sc = y[4:16]
    for j in range(QK_K // 32):
        ls = to_u8(nearest_int(inv_scale * scales[j]))
        lm = to_u8(nearest_int(inv_min * mins[j]))
        ls = min(63, ls)
        lm = min(63, lm)
        _pack_scale_min_k4(sc, j, ls, lm)
    put_fp16(y, 0, max_scale / f32(63.0))
    put_fp16(y, 2, max_min / f32(63.0))


@njit(cache=True, error_model="numpy")
def _k4_impl_header(x, y, qw, L, Laux, weights, mins, scales, sw, Ls, Lm, nmax, clamp):
    """Q4_K/Q5_K impl: weighted make_qkx3_quants per sub-block, make_qp_quants for scales/mins, header bytes."""
    sum_x2 = f32(0.0)
    for l in range(QK_K):
        sum_x2 += x[l] * x[l]
    sigma2 = f32(2.0) * sum_x2 / f32(QK_K)
    av_x = np.sqrt(sigma2)
    for j in range(QK_K // 32):
        if qw.shape[0] > 0:
            for l in range(32):
                weights[l] = qw[32 * j + l] * np.sqrt(sigma2 + x[32 * j + l] * x[32 * j + l])
        else:
            for l in range(32):
                weights[l] = av_x + abs(x[32 * j + l])
        sumw = f32(0.0)
        for l in range(32):
            sumw += weights[l]
        sw[j] = sumw
        sc, mn = make_qkx3_quants(32, nmax, x[32 * j:32 * j + 32], weights, L[32 * j:32 * j + 32], Laux,
                                  -0.9, 0.05, 36, False)
        scales[j] = sc
        mins[j] = mn
    d_block = make_qp_quants(QK_K // 32, 63, scales, Ls, sw)
    m_block = make_qp_quants(QK_K // 32, 63, mins, Lm, sw)
    sc = y[4:16]
    for j in range(QK_K // 32):
        ls = np.int64(Ls[j])
        lm = np.int64(Lm[j])
        if clamp:
            ls = min(63, ls)
            lm = min(63, lm)
        _pack_scale_min_k4(sc, j, ls, lm)
    put_fp16(y, 0, d_block)
    put_fp16(y, 2, m_block)


@njit(cache=True, error_model="numpy")
def _q4k_pack(L, y):
    for jj in range(QK_K // 64):
        j = 64 * jj
        for l in range(32):
            y[16 + 32 * jj + l] = to_u8(np.int64(L[j + l]) | (np.int64(L[j + l + 32]) << 4))


@njit(cache=True, error_model="numpy")
def _q5k_pack(L, y):
    qh = y[16:48]
    for j in range(32):
        qh[j] = 0
    m1 = 1
    m2 = 2
    for jj in range(QK_K // 64):
        n = 64 * jj
        for j in range(32):
            l1 = np.int64(L[n + j])
            if l1 > 15:
                l1 -= 16
                qh[j] = to_u8(np.int64(qh[j]) | m1)
            l2 = np.int64(L[n + j + 32])
            if l2 > 15:
                l2 -= 16
                qh[j] = to_u8(np.int64(qh[j]) | m2)
            y[48 + 32 * jj + j] = to_u8(l1 | (l2 << 4))
        m1 = (m1 << 2) & 0xFF
        m2 = (m2 << 2) & 0xFF


@njit(cache=True, error_model="numpy")
def _q45k_row(x, y, qw, nmax):
    """Quantize one row to Q4_K (nmax 15) or Q5_K (nmax 31)."""
    bsize = Q4_K_SIZE if nmax == 15 else Q5_K_SIZE
    L = np.zeros(QK_K, np.uint8)
    Laux = np.zeros(32, np.uint8)
    weights = np.zeros(32, np.float32)
    mins = np.zeros(QK_K // 32, np.float32)
    scales = np.zeros(QK_K // 32, np.float32)
    sw = np.zeros(QK_K // 32, np.float32)
    Ls = np.zeros(QK_K // 32, np.uint8)
    Lm = np.zeros(QK_K // 32, np.uint8)
    for i in range(x.shape[0] // QK_K):
        xb = x[QK_K * i:QK_K * (i + 1)]
        yb = y[bsize * i:bsize * (i + 1)]
        if qw.shape[0] == 0:
            if nmax == 15:
                ms, mm = _k4_scales_ref(xb, L, Laux, weights, mins, scales, 15, -1.0, 0.1, 20)
            else:
                ms, mm = _k4_scales_ref(xb, L, Laux, weights, mins, scales, 31, -0.5, 0.1, 15)
            _k4_header_ref(yb, mins, scales, ms, mm)
        else:
            _k4_impl_header(xb, yb, qw[QK_K * i:QK_K * (i + 1)], L, Laux, weights, mins, scales, sw, Ls, Lm,
                            nmax, nmax == 31)
        _requant_k4(xb, yb, L, QK_K // 32, nmax)
        if nmax == 15:
            _q4k_pack(L, yb)
        else:
            _q5k_pack(L, yb)


@njit(cache=True, error_model="numpy")
def _q45k_deq_row(b, y, nmax):
    bsize = Q4_K_SIZE if nmax == 15 else Q5_K_SIZE
    for i in range(y.shape[0] // QK_K):
        blk = b[bsize * i:bsize * (i + 1)]
        d = get_fp16(blk, 0)
        mn = get_fp16(blk, 2)
        sc = blk[4:16]
        o = QK_K * i
        u1 = 1
        u2 = 2
        for jj in range(QK_K // 64):
            s, m = _get_scale_min_k4(2 * jj, sc)
            d1 = d * f32(s)
            m1 = mn * f32(m)
            s, m = _get_scale_min_k4(2 * jj + 1, sc)
            d2 = d * f32(s)
            m2 = mn * f32(m)
            if nmax == 15:
                q = 16 + 32 * jj
                for l in range(32):
                    y[o + l] = d1 * f32(np.int64(blk[q + l]) & 0xF) - m1
                for l in range(32):
                    y[o + 32 + l] = d2 * f32(np.int64(blk[q + l]) >> 4) - m2
            else:
                q = 48 + 32 * jj
                for l in range(32):
                    h = 16 if (np.int64(blk[16 + l]) & u1) else 0
                    y[o + l] = d1 * f32((np.int64(blk[q + l]) & 0xF) + h) - m1
                for l in range(32):
                    h = 16 if (np.int64(blk[16 + l]) & u2) else 0
                    y[o + 32 + l] = d2 * f32((np.int64(blk[q + l]) >> 4) + h) - m2
            o += 64
            u1 <<= 2
            u2 <<= 2


# ----------------------------------------------------------------------------------------------- Q6_K


@njit(cache=True, error_model="numpy")
def _ni32(fval):
    """nearest_int in int32 arithmetic (same bits as common.nearest_int; int32 lanes vectorize better)."""
    return (f32_as_i32(fval + f32(12582912.0)) & np.int32(0x007FFFFF)) - np.int32(0x00400000)


@njit(cache=True, error_model="numpy")
def _q6k_scales(x, qw, xt, wt, mx, isc, sumlx, suml2, bscale, bisc, scales, L):
    """make_qx_quants(16, 32, x + 16*ib, L + 16*ib, 1, qw) for the 16 sub-blocks of one super-block at once.

    The same arithmetic as search.make_qx_quants, element for element and in C's order within each sub-block, but
    with the 16 sub-blocks as the inner loop (16 independent float32 lanes: LLVM vectorizes it) instead of 16
    scalar passes; each candidate scale's sums are formed first and compared in ggml's order (is = 0, then -9..9).
    L is written only for the sub-blocks whose 8-bit scale later rounds to 0 (the only ones whose make_qx_quants
    levels reach the file: quantize_row_q6_K recomputes every other level), see _q6k_block."""
    for ib in range(16):
        for i in range(16):
            v = x[16 * ib + i]
            xt[16 * i + ib] = v
            wt[16 * i + ib] = qw[16 * ib + i] if qw.shape[0] > 0 else v * v
    for ib in range(16):
        mx[ib] = f32(0.0)
        isc[ib] = f32(0.0)  # amax, reused below
    for i in range(16):
        for ib in range(16):
            v = xt[16 * i + ib]
            av = abs(v)
            gt = av > isc[ib]
            isc[ib] = av if gt else isc[ib]
            mx[ib] = v if gt else mx[ib]
    for ib in range(16):
        bscale[ib] = f32(0.0) if isc[ib] < GROUP_MAX_EPS else f32(1.0)  # 0: all-zero sub-block (scale 0, L 0)
    for k in range(19):
        is_ = k - 9
        for ib in range(16):
            if is_ == 0:
                isc[ib] = f32(-32.0) / mx[ib]
            else:
                isc[ib] = -(f32(32.0) + f32(0.1) * f32(is_)) / mx[ib]
            sumlx[16 * k + ib] = f32(0.0)
            suml2[16 * k + ib] = f32(0.0)
        for i in range(16):
            for ib in range(16):
                v = xt[16 * i + ib]
                l = _ni32(isc[ib] * v)
                l = max(np.int32(-32), min(np.int32(31), l))
                w = wt[16 * i + ib]
                fl = f32(l)
                sumlx[16 * k + ib] += w * v * fl
                suml2[16 * k + ib] += w * fl * fl
    for ib in range(16):
        if bscale[ib] == f32(0.0):
            scales[ib] = f32(0.0)
            bisc[ib] = f32(0.0)
            continue
        slx = sumlx[16 * 9 + ib]
        sl2 = suml2[16 * 9 + ib]
        scale = slx / sl2 if sl2 != f32(0.0) else f32(0.0)
        best = scale * slx
        win = 0
        for is_ in range(-9, 10):
            if is_ == 0:
                continue
            slx = sumlx[16 * (is_ + 9) + ib]
            sl2 = suml2[16 * (is_ + 9) + ib]
            if sl2 > f32(0.0) and slx * slx > best * sl2:
                scale = slx / sl2
                best = scale * slx
                win = is_
        scales[ib] = scale
        bisc[ib] = f32(-32.0) / mx[ib] if win == 0 else -(f32(32.0) + f32(0.1) * f32(win)) / mx[ib]


@njit(cache=True, error_model="numpy")
def _q6k_block(x, y, qw, L, scales, scratch):
    """quantize_row_q6_K_ref (qw empty) / quantize_row_q6_K_impl (qw = this block's importance) on one block."""
    xt = scratch[0:256]
    wt = scratch[256:512]
    mx = scratch[512:528]
    isc = scratch[528:544]
    bscale = scratch[544:560]
    bisc = scratch[560:576]
    sumlx = scratch[576:880]
    suml2 = scratch[880:1184]
    _q6k_scales(x, qw, xt, wt, mx, isc, sumlx, suml2, bscale, bisc, scales, L)
    max_scale = f32(0.0)
    max_abs_scale = f32(0.0)
    for ib in range(QK_K // 16):
        scale = scales[ib]
        abs_scale = abs(scale)
        if abs_scale > max_abs_scale:
            max_abs_scale = abs_scale
            max_scale = scale
    if max_abs_scale < GROUP_MAX_EPS:
        for k in range(Q6_K_SIZE):
            y[k] = 0
        put_fp16(y, 208, f32(0.0))
        return
    iscale = f32(-128.0) / max_scale
    put_fp16(y, 208, f32(1.0) / iscale)
    for ib in range(QK_K // 16):
        y[192 + ib] = to_u8(min(127, nearest_int(iscale * scales[ib])))
    dd = get_fp16(y, 208)
    for j in range(QK_K // 16):
        d = dd * f32(to_i8(np.int64(y[192 + j])))
        if d == f32(0.0):
            # make_qx_quants' own levels stay (0 for an all-zero sub-block, else its best scale's)
            bi = bisc[j]
            for ii in range(16):
                if bscale[j] == f32(0.0):
                    L[16 * j + ii] = 0
                else:
                    l = nearest_int(bi * x[16 * j + ii])
                    L[16 * j + ii] = 32 + max(-32, min(31, l))
            continue
        for ii in range(16):
            l = _ni32(x[16 * j + ii] / d)
            L[16 * j + ii] = max(np.int32(-32), min(np.int32(31), l)) + np.int32(32)
    for jj in range(QK_K // 128):
        j = 128 * jj
        ql = 64 * jj
        qh = 128 + 32 * jj
        for l in range(32):
            a = np.int64(L[j + l])
            b = np.int64(L[j + l + 32])
            c = np.int64(L[j + l + 64])
            e = np.int64(L[j + l + 96])
            y[ql + l] = to_u8((a & 0xF) | ((c & 0xF) << 4))
            y[ql + l + 32] = to_u8((b & 0xF) | ((e & 0xF) << 4))
            y[qh + l] = to_u8((a >> 4) | ((b >> 4) << 2) | ((c >> 4) << 4) | ((e >> 4) << 6))


@njit(cache=True, error_model="numpy")
def _q6k_row(x, y, qw):
    L = np.zeros(QK_K, np.int8)
    scales = np.zeros(QK_K // 16, np.float32)
    scratch = np.zeros(1184, np.float32)
    for i in range(x.shape[0] // QK_K):
        qwb = qw[QK_K * i:QK_K * (i + 1)]  # empty stays empty: C's NULL
        _q6k_block(x[QK_K * i:QK_K * (i + 1)], y[Q6_K_SIZE * i:Q6_K_SIZE * (i + 1)], qwb, L, scales, scratch)


@njit(cache=True, error_model="numpy")
def _q6k_deq_row(b, y):
    for i in range(y.shape[0] // QK_K):
        blk = b[Q6_K_SIZE * i:Q6_K_SIZE * (i + 1)]
        d = get_fp16(blk, 208)
        for nn in range(QK_K // 128):
            o = QK_K * i + 128 * nn
            ql = 64 * nn
            qh = 128 + 32 * nn
            sc = 192 + 8 * nn
            for l in range(32):
                is_ = l // 16
                h = np.int64(blk[qh + l])
                q1 = to_i8((np.int64(blk[ql + l]) & 0xF) | (((h >> 0) & 3) << 4)) - 32
                q2 = to_i8((np.int64(blk[ql + l + 32]) & 0xF) | (((h >> 2) & 3) << 4)) - 32
                q3 = to_i8((np.int64(blk[ql + l]) >> 4) | (((h >> 4) & 3) << 4)) - 32
                q4 = to_i8((np.int64(blk[ql + l + 32]) >> 4) | (((h >> 6) & 3) << 4)) - 32
                y[o + l] = d * f32(to_i8(np.int64(blk[sc + is_ + 0]))) * f32(q1)
                y[o + l + 32] = d * f32(to_i8(np.int64(blk[sc + is_ + 2]))) * f32(q2)
                y[o + l + 64] = d * f32(to_i8(np.int64(blk[sc + is_ + 4]))) * f32(q3)
                y[o + l + 96] = d * f32(to_i8(np.int64(blk[sc + is_ + 6]))) * f32(q4)


# ----------------------------------------------------------------------------------------------- drivers

@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q2_k(x, qw, out):
    for r in prange(x.shape[0]):
        _q2k_row(x[r], out[r], qw)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q3_k(x, qw, out):
    for r in prange(x.shape[0]):
        _q3k_row(x[r], out[r], qw)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q4_k(x, qw, out):
    for r in prange(x.shape[0]):
        _q45k_row(x[r], out[r], qw, 15)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q5_k(x, qw, out):
    for r in prange(x.shape[0]):
        _q45k_row(x[r], out[r], qw, 31)


@njit(parallel=True, cache=True, error_model="numpy")
def _quantize_q6_k(x, qw, out):
    for r in prange(x.shape[0]):
        _q6k_row(x[r], out[r], qw)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q2_k(raw, out):
    for r in prange(raw.shape[0]):
        _q2k_deq_row(raw[r], out[r])


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q3_k(raw, out):
    for r in prange(raw.shape[0]):
        _q3k_deq_row(raw[r], out[r])


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q4_k(raw, out):
    for r in prange(raw.shape[0]):
        _q45k_deq_row(raw[r], out[r], 15)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q5_k(raw, out):
    for r in prange(raw.shape[0]):
        _q45k_deq_row(raw[r], out[r], 31)


@njit(parallel=True, cache=True, error_model="numpy")
def _dequantize_q6_k(raw, out):
    for r in prange(raw.shape[0]):
        _q6k_deq_row(raw[r], out[r])


# name -> (row driver for quantize, row driver for dequantize, bytes per super-block)
_DRIVERS = {
    "Q2_K": (_quantize_q2_k, _dequantize_q2_k, Q2_K_SIZE),
    "Q3_K": (_quantize_q3_k, _dequantize_q3_k, Q3_K_SIZE),
    "Q4_K": (_quantize_q4_k, _dequantize_q4_k, Q4_K_SIZE),
    "Q5_K": (_quantize_q5_k, _dequantize_q5_k, Q5_K_SIZE),
    "Q6_K": (_quantize_q6_k, _dequantize_q6_k, Q6_K_SIZE),
}


def _make(name: str):
    qdrv, ddrv, bsize = _DRIVERS[name]

    def quantize(x: np.ndarray, imatrix: np.ndarray | None) -> np.ndarray:
        """Quantize float32 (rows, cols) to `name` blocks exactly as ggml_quantize_chunk does."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        rows, cols = x.shape
        out = np.empty((rows, cols // QK_K * bsize), dtype=np.uint8)
        qw = np.zeros(0, np.float32) if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
        qdrv(x, qw, out)
        return out

    def dequantize(raw: np.ndarray, cols: int) -> np.ndarray:
        """Decode `name` blocks (rows, row_bytes) to float32 (rows, cols), as dequantize_row_* does."""
        raw = np.ascontiguousarray(raw, dtype=np.uint8)
        out = np.empty((raw.shape[0], cols), dtype=np.float32)
        ddrv(raw, out)
        return out

    quantize.__name__ = f"quantize_{name.lower()}"
    dequantize.__name__ = f"dequantize_{name.lower()}"
    return quantize, dequantize


KERNELS = {name: _make(name) for name in _DRIVERS}
