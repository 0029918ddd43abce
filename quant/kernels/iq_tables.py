"""The i-quant search tables ggml_quantize_init builds (iq2xs_init_impl, iq3xs_init_impl), computed the same way.

For each grid: `grid` (points, coordinates) int8 with the quantizer's odd levels 2l+1; `kmap` maps a packed level
vector to its grid index, or for an off-grid vector to -(offset+1) into `neighbours`, where
neighbours[offset] = n is followed by the n grid indices of the `nwant` nearest distance classes, sorted by
(squared distance, index) as ggml's qsort with iq2/iq3_compare_func orders them (the order is total, so any sort
gives the same list). Built once per process on first use (about a second for the 2048-point IQ1 grid).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from numba import njit

from core.errors import QuantizationError
from quant.kernels import iq_grids


@dataclass(frozen=True)
class IQTables:
    """One grid's search tables, laid out as in ggml's iq2_entry_t / iq3_entry_t."""

    grid: np.ndarray  # int8 (points, ndim), values 2l+1
    kmap: np.ndarray  # int32 (4^8 or 8^4 region used)
    neighbours: np.ndarray  # uint16


@njit(cache=True)
def _build(kgrid, bits, ndim, kmap_size, nwant):
    npts = kgrid.shape[0]
    mask = (1 << bits) - 1
    grid = np.empty((npts, ndim), np.int8)
    for k in range(npts):
        for i in range(ndim):
            grid[k, i] = 2 * ((np.int64(kgrid[k]) >> (bits * i)) & mask) + 1
    kmap = np.full(kmap_size, -1, np.int32)
    for k in range(npts):
        index = 0
        for i in range(ndim):
            index |= ((np.int64(grid[k, i]) - 1) // 2) << (bits * i)
        kmap[index] = k
    # first pass: count; second: fill (the C code's two passes, serial here)
    d2 = np.empty(npts, np.int64)
    pos = np.empty(ndim, np.int64)
    classes = np.empty(nwant, np.int64)
    total = 0
    for i in range(kmap_size):
        if kmap[i] >= 0:
            continue
        total += 1 + _distance_classes(i, grid, bits, mask, nwant, d2, pos, classes)[0]
    neighbours = np.empty(total, np.uint16)
    counter = 0
    for i in range(kmap_size):
        if kmap[i] >= 0:
            continue
        n, nclass = _distance_classes(i, grid, bits, mask, nwant, d2, pos, classes)
        kmap[i] = -(counter + 1)
        neighbours[counter] = n
        c = counter + 1
        for m in range(nclass):  # ascending distance, ascending index within a distance: ggml's sorted order
            for j in range(npts):
                if d2[j] == classes[m]:
                    neighbours[c] = j
                    c += 1
        counter += 1 + n
    return grid, kmap, neighbours


@njit(cache=True)
def _distance_classes(i, grid, bits, mask, nwant, d2, pos, classes):
    """Squared distances d2[j] from level vector i to every grid point and the `nwant` smallest distinct values
    (classes, ascending); returns (points in those classes, number of classes): what ggml keeps after its qsort."""
    npts, ndim = grid.shape
    for k in range(ndim):
        pos[k] = 2 * ((i >> (bits * k)) & mask) + 1
    nclass = 0
    for j in range(npts):
        v = 0
        for k in range(ndim):
            d = np.int64(grid[j, k]) - pos[k]
            v += d * d
        d2[j] = v
        m = 0  # insert v into the ascending list of the nwant smallest distinct distances
        while m < nclass and classes[m] < v:
            m += 1
        if m >= nwant or (m < nclass and classes[m] == v):
            continue
        top = nclass if nclass < nwant else nwant - 1
        for t in range(top, m, -1):
            classes[t] = classes[t - 1]
        classes[m] = v
        if nclass < nwant:
            nclass += 1
    n = 0
    for j in range(npts):
        for m in range(nclass):
            if d2[j] == classes[m]:
                n += 1
                break
    return n, nclass


# type -> (seed, bits per coordinate, coordinates, kmap size, nwant), as in iq2xs_init_impl / iq3xs_init_impl
_SPECS = {
    "IQ2_XXS": ("KGRID_IQ2XXS", 2, 8, 43692, 2),
    "IQ2_XS": ("KGRID_IQ2XS", 2, 8, 43692, 2),
    "IQ2_S": ("KGRID_IQ2S", 2, 8, 43692, 1),
    "IQ1_S": ("KGRID_IQ1S", 2, 8, 43692, 3),
    "IQ1_M": ("KGRID_IQ1S", 2, 8, 43692, 3),
    "IQ3_XXS": ("KGRID_IQ3XXS", 3, 4, 4096, 2),
    "IQ3_S": ("KGRID_IQ3S", 3, 4, 4096, 3),
}


@functools.cache
def tables(qtype: str) -> IQTables:
    """The grid, map and neighbour tables ggml_quantize_init(qtype) builds (IQ1_S and IQ1_M share one)."""
    seed, bits, ndim, kmap_size, nwant = _SPECS[qtype]
    if qtype == "IQ1_M":
        return tables("IQ1_S")
    grid, kmap, neighbours = _build(getattr(iq_grids, seed), bits, ndim, kmap_size, nwant)
    return IQTables(grid, kmap, neighbours)


# --------------------------------------------------------------------------------------------- shared search


FLT_MAX = np.float32(3.4028234663852886e38)


@njit(cache=True, error_model="numpy")
def best_neighbour8(neighbours, start, gv, xval, weight, scale, off):
    """The 8-coordinate neighbour search of iq2_find_best_neighbour / iq1_find_best_neighbour2 with the grid values
    pre-converted: gv[g, i] is the float32 ggml computes per use (float(pg[i]), or xg[(pg[i]-1)/2] for IQ1), so every
    distance d2 = sum_i w_i*(scale*gv[g,i] - x_i)^2 is formed by the same float ops in the same order as in C.
    Returns the index of the first neighbour with the smallest d2 below FLT_MAX, or -1 (ggml asserts)."""
    x0 = xval[off]
    x1 = xval[off + 1]
    x2 = xval[off + 2]
    x3 = xval[off + 3]
    x4 = xval[off + 4]
    x5 = xval[off + 5]
    x6 = xval[off + 6]
    x7 = xval[off + 7]
    w0 = weight[off]
    w1 = weight[off + 1]
    w2 = weight[off + 2]
    w3 = weight[off + 3]
    w4 = weight[off + 4]
    w5 = weight[off + 5]
    w6 = weight[off + 6]
    w7 = weight[off + 7]
    n = np.int64(neighbours[start])
    best_d2 = FLT_MAX
    grid_index = -1
    for j in range(start + 1, start + n + 1):
        g = np.int64(neighbours[j])
        d = scale * gv[g, 0] - x0
        d2 = np.float32(0.0) + w0 * d * d
        d = scale * gv[g, 1] - x1
        d2 += w1 * d * d
        d = scale * gv[g, 2] - x2
        d2 += w2 * d * d
        d = scale * gv[g, 3] - x3
        d2 += w3 * d * d
        d = scale * gv[g, 4] - x4
        d2 += w4 * d * d
        d = scale * gv[g, 5] - x5
        d2 += w5 * d * d
        d = scale * gv[g, 6] - x6
        d2 += w6 * d * d
        d = scale * gv[g, 7] - x7
        d2 += w7 * d * d
        if d2 < best_d2:
            best_d2 = d2
            grid_index = g
    return grid_index


@njit(cache=True, error_model="numpy")
def best_neighbour4(neighbours, start, gv, xval, weight, scale, off):
    """iq3_find_best_neighbour's search, as best_neighbour8 for 4 coordinates (gv[g, i] = float(pg[i]))."""
    x0 = xval[off]
    x1 = xval[off + 1]
    x2 = xval[off + 2]
    x3 = xval[off + 3]
    w0 = weight[off]
    w1 = weight[off + 1]
    w2 = weight[off + 2]
    w3 = weight[off + 3]
    n = np.int64(neighbours[start])
    best_d2 = FLT_MAX
    grid_index = -1
    for j in range(start + 1, start + n + 1):
        g = np.int64(neighbours[j])
        d = scale * gv[g, 0] - x0
        d2 = np.float32(0.0) + w0 * d * d
        d = scale * gv[g, 1] - x1
        d2 += w1 * d * d
        d = scale * gv[g, 2] - x2
        d2 += w2 * d * d
        d = scale * gv[g, 3] - x3
        d2 += w3 * d * d
        if d2 < best_d2:
            best_d2 = d2
            grid_index = g
    return grid_index


@functools.cache
def value_grid(qtype: str) -> tuple[np.ndarray, np.ndarray]:
    """The grid as float32 (the `float q = pg[i]` ggml converts per use, tabled once) and its levels (pg[i]-1)/2."""
    g = tables(qtype).grid
    return g.astype(np.float32), ((g.astype(np.int64) - 1) // 2).astype(np.int8)


# kmask_iq2xs / ksigns_iq2xs of ggml-common.h: bit masks, and 7 sign bits completed with their parity bit
KMASK = np.array([1, 2, 4, 8, 16, 32, 64, 128], np.int64)
KSIGNS = np.array([i | ((bin(i).count("1") & 1) << 7) for i in range(128)], np.int64)


def run_quantize(qtype: str, driver, block_bytes: int, x: np.ndarray, imatrix: np.ndarray | None,
                 extra: tuple = ()) -> np.ndarray:
    """Run an i-quant row driver `driver(x, qw, out, ok, grid, kmap, neighbours, *extra)` over float32 (rows, cols);
    raise QuantizationError where it reports a row on which ggml would abort."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    out = np.empty((rows, cols // 256 * block_bytes), dtype=np.uint8)
    qw = np.zeros(0, np.float32) if imatrix is None else np.ascontiguousarray(imatrix, dtype=np.float32)
    ok = np.ones(rows, np.bool_)
    t = tables(qtype)
    driver(x, qw, out, ok, t.grid, t.kmap, t.neighbours, *extra)
    if not ok.all():
        raise QuantizationError(
            f"ggml's {qtype} quantizer aborts on row {int(np.flatnonzero(~ok)[0])} of this input (its weights "
            "overflow to inf/NaN, so no grid point is at a finite distance); choose another type for this tensor"
        )
    return out
