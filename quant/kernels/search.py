"""ggml's scale/level searches (make_qx_quants, make_q3_quants, make_qkx2/3_quants, make_qp_quants), bit-exact.

Literal ports of ggml-quants.c: float32 everywhere C uses float, C's operation order and sequential accumulation,
C's int->float conversions made explicit (`f32(l)`). A weights/qw array of length 0 stands for C's NULL.
No fastmath: LLVM must neither reassociate nor contract to FMA (the oracle is built with -ffp-contract=off).
"""
# ruff: noqa: PLR1730, FURB136  -- C's `if (a > b) b = a` kept literally: min()/max() differ on NaN/-0.0
from __future__ import annotations

import numpy as np
from numba import njit

from quant.kernels.common import nearest_int

f32 = np.float32

GROUP_MAX_EPS = np.float32(1e-15)


@njit(cache=True, error_model="numpy")
def make_qx_quants(n, nmax, x, L, rmse_type, qw):
    """Symmetric quantization of x[:n] to L in [0, 2*nmax) with an rmse-weighted scale search; returns the scale."""
    has_qw = qw.shape[0] > 0
    max_ = f32(0.0)
    amax = f32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(-nmax) / max_
    if rmse_type == 0:
        for i in range(n):
            l = nearest_int(iscale * x[i])
            L[i] = nmax + max(-nmax, min(nmax - 1, l))
        return f32(1.0) / iscale
    return_early = False
    if rmse_type < 0:
        rmse_type = -rmse_type
        return_early = True
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
        w = _qx_weight(has_qw, qw, x, i, rmse_type)
        fl = f32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    scale = sumlx / suml2 if suml2 != f32(0.0) else f32(0.0)
    if return_early:
        return f32(0.5) * (scale + f32(1.0) / iscale) if suml2 > f32(0.0) else f32(1.0) / iscale
    best = scale * sumlx
    for is_ in range(-9, 10):
        if is_ == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(is_)) / max_
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            w = _qx_weight(has_qw, qw, x, i, rmse_type)
            fl = f32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        if suml2 > f32(0.0) and sumlx * sumlx > best * suml2:
            for i in range(n):
                l = nearest_int(iscale * x[i])
                L[i] = nmax + max(-nmax, min(nmax - 1, l))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, error_model="numpy")
def _qx_weight(has_qw, qw, x, i, rmse_type):
    """The per-element weight of make_qx_quants (qw, or x^2 / 1 / |x| / sqrt|x| by rmse_type)."""
    if has_qw:
        return qw[i]
    if rmse_type == 1:
        return x[i] * x[i]
    if rmse_type == 2:
        return f32(1.0)
    if rmse_type == 3:
        return abs(x[i])
    return np.sqrt(abs(x[i]))


@njit(cache=True, error_model="numpy")
def make_q3_quants(n, nmax, x, L, do_rmse):
    """Symmetric quantization for Q3_K's ref path (x^2-weighted coordinate descent); L in [0, 2*nmax)."""
    max_ = f32(0.0)
    amax = f32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            max_ = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(-nmax) / max_
    if do_rmse:
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            l = nearest_int(iscale * x[i])
            l = max(-nmax, min(nmax - 1, l))
            L[i] = l
            w = x[i] * x[i]
            fl = f32(l)
            sumlx += w * x[i] * fl
            suml2 += w * fl * fl
        for itry in range(5):
            n_changed = 0
            for i in range(n):
                w = x[i] * x[i]
                fLi = f32(L[i])
                slx = sumlx - w * x[i] * fLi
                if slx > f32(0.0):
                    sl2 = suml2 - w * fLi * fLi
                    new_l = nearest_int(x[i] * sl2 / slx)
                    new_l = max(-nmax, min(nmax - 1, new_l))
                    if new_l != L[i]:
                        fnl = f32(new_l)
                        slx += w * x[i] * fnl
                        sl2 += w * fnl * fnl
                        if sl2 > f32(0.0) and slx * slx * suml2 > sumlx * sumlx * sl2:
                            L[i] = new_l
                            sumlx = slx
                            suml2 = sl2
                            n_changed += 1
            if n_changed == 0:
                break
        for i in range(n):
            L[i] += nmax
        return sumlx / suml2 if suml2 > f32(0.0) else f32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = max(-nmax, min(nmax - 1, l))
        L[i] = l + nmax
    return f32(1.0) / iscale


@njit(cache=True, error_model="numpy")
def make_qkx2_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Asymmetric (scale, min) search of ggml's ref K paths; returns (scale, the_min) with L in [0, nmax]."""
    rmin_f = f32(rmin)
    rdelta_f = f32(rdelta)
    min_ = x[0]
    max_ = x[0]
    sum_w = weights[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_:
            min_ = x[i]
        if x[i] > max_:
            max_ = x[i]
        w = weights[i]
        sum_w += w
        sum_x += w * x[i]
    if min_ > f32(0.0):
        min_ = f32(0.0)
    if max_ == min_:
        for i in range(n):
            L[i] = 0
        return f32(0.0), -min_
    iscale = f32(nmax) / (max_ - min_)
    scale = f32(1.0) / iscale
    best_error = f32(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - min_))
        l = max(0, min(nmax, l))
        L[i] = l
        diff = scale * f32(l) + min_ - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i]
        best_error += w * diff
    if nstep < 1:
        return scale, -min_
    for is_ in range(nstep + 1):
        iscale = (rmin_f + rdelta_f * f32(is_) + f32(nmax)) / (max_ - min_)
        for i in range(n):  # the levels first (nothing carried between elements: LLVM vectorizes this loop) ...
            l = nearest_int(iscale * (x[i] - min_))
            Laux[i] = max(0, min(nmax, l))
        sum_l = f32(0.0)  # ... then C's sums, in C's order (float32, not reassociated): the same values
        sum_l2 = f32(0.0)
        sum_xl = f32(0.0)
        for i in range(n):
            w = weights[i]
            fl = f32(Laux[i])
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > f32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > f32(0.0):
                this_min = f32(0.0)
                this_scale = sum_xl / sum_l2
            cur_error = f32(0.0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = weights[i]
                cur_error += w * diff
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                min_ = this_min
    return scale, -min_


@njit(cache=True, error_model="numpy")
def make_qkx3_quants(n, nmax, x, weights, L, Laux, rmin, rdelta, nstep, use_mad):
    """Asymmetric (scale, min) search of ggml's imatrix paths (weights NULL = x^2); returns (scale, the_min)."""
    rmin_f = f32(rmin)
    rdelta_f = f32(rdelta)
    has_w = weights.shape[0] > 0
    min_ = x[0]
    max_ = x[0]
    sum_w = weights[0] if has_w else x[0] * x[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < min_:
            min_ = x[i]
        if x[i] > max_:
            max_ = x[i]
        w = weights[i] if has_w else x[i] * x[i]
        sum_w += w
        sum_x += w * x[i]
    if min_ > f32(0.0):
        min_ = f32(0.0)
    if max_ <= min_:
        for i in range(n):
            L[i] = 0
        return f32(0.0), -min_
    iscale = f32(nmax) / (max_ - min_)
    scale = f32(1.0) / iscale
    best_mad = f32(0.0)
    for i in range(n):
        l = nearest_int(iscale * (x[i] - min_))
        l = max(0, min(nmax, l))
        L[i] = l
        diff = scale * f32(l) + min_ - x[i]
        diff = abs(diff) if use_mad else diff * diff
        w = weights[i] if has_w else x[i] * x[i]
        best_mad += w * diff
    if nstep < 1:
        return scale, -min_
    for is_ in range(nstep + 1):
        iscale = (rmin_f + rdelta_f * f32(is_) + f32(nmax)) / (max_ - min_)
        sum_l = f32(0.0)
        sum_l2 = f32(0.0)
        sum_xl = f32(0.0)
        for i in range(n):
            l = nearest_int(iscale * (x[i] - min_))
            l = max(0, min(nmax, l))
            Laux[i] = l
            w = weights[i] if has_w else x[i] * x[i]
            fl = f32(l)
            sum_l += w * fl
            sum_l2 += w * fl * fl
            sum_xl += w * fl * x[i]
        D = sum_w * sum_l2 - sum_l * sum_l
        if D > f32(0.0):
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            if this_min > f32(0.0):
                this_min = f32(0.0)
                this_scale = sum_xl / sum_l2
            mad = f32(0.0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[i]
                diff = abs(diff) if use_mad else diff * diff
                w = weights[i] if has_w else x[i] * x[i]
                mad += w * diff
            if mad < best_mad:
                for i in range(n):
                    L[i] = Laux[i]
                best_mad = mad
                scale = this_scale
                min_ = this_min
    return scale, -min_


@njit(cache=True, error_model="numpy")
def make_qp_quants(n, nmax, x, L, quant_weights):
    """Quantize non-negative x[:n] (sub-block scales or mins) to L in [0, nmax] with weights; returns the scale."""
    max_ = f32(0.0)
    for i in range(n):
        max_ = max_ if max_ > x[i] else x[i]
    if max_ < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0.0)
    iscale = f32(nmax) / max_
    for i in range(n):
        L[i] = nearest_int(iscale * x[i])
    scale = f32(1.0) / iscale
    best_mse = f32(0.0)
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        w = quant_weights[i]
        best_mse += w * diff * diff
    for is_ in range(-4, 5):
        if is_ == 0:
            continue
        iscale_is = (f32(0.1) * f32(is_) + f32(nmax)) / max_
        scale_is = f32(1.0) / iscale_is
        mse = f32(0.0)
        for i in range(n):
            l = nearest_int(iscale_is * x[i])
            l = min(nmax, l)
            diff = x[i] - scale_is * f32(l)
            w = quant_weights[i]
            mse += w * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = nearest_int(iscale * x[i])
        l = min(nmax, l)
        L[i] = l
        w = quant_weights[i]
        fl = f32(l)
        sumlx += w * x[i] * fl
        suml2 += w * fl * fl
    for itry in range(5):
        n_changed = 0
        for i in range(n):
            w = quant_weights[i]
            fLi = f32(L[i])
            slx = sumlx - w * x[i] * fLi
            sl2 = suml2 - w * fLi * fLi
            if slx > f32(0.0) and sl2 > f32(0.0):
                new_l = nearest_int(x[i] * sl2 / slx)
                new_l = min(nmax, new_l)
                if new_l != L[i]:
                    fnl = f32(new_l)
                    slx += w * x[i] * fnl
                    sl2 += w * fnl * fnl
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > f32(0.0) else f32(0.0)
