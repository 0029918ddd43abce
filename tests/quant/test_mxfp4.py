"""MXFP4: every block byte-identical to ggml_quantize_chunk (which ignores the imatrix), including amax at and just
around every power of two (floorf(log2f)), dequantize equal to gguf.quants."""
from __future__ import annotations

import numpy as np
import pytest
from gguf.quants import MXFP4 as GgufMXFP4

import quant
from quant.formats import get_qtype
from quant.kernels import mxfp4
from tests.quant.kernel_cases import (
    FAMILIES,
    IMATRIX,
    assert_matches_ggml,
    gguf_dequant,
    make_family,
    make_imatrix,
)

# 3,456 blocks per call; three imatrix variants (each with its own data seed) give 10,368 per family
ROWS, COLS = 24, 32 * 144


@pytest.mark.oracle
@pytest.mark.parametrize("imatrix_kind", IMATRIX)
@pytest.mark.parametrize("family", FAMILIES)
def test_matches_ggml(require_oracle, family, imatrix_kind):
    x = make_family(family, ROWS, COLS, seed=IMATRIX.index(imatrix_kind), block=32)
    w = make_imatrix(imatrix_kind, COLS)
    assert_matches_ggml(require_oracle, x, "MXFP4", w, f"MXFP4/{family}/imatrix={imatrix_kind}")


@pytest.mark.oracle
def test_powers_of_two_and_neighbours_match_ggml(require_oracle):
    """amax = 2^k and its float32 neighbours for every k (subnormals included): the shared exponent's edges."""
    p = np.float32(2.0) ** np.arange(-149, 128, dtype=np.float32)
    amax = np.concatenate([p, np.nextafter(p, np.float32(0)), np.nextafter(p, np.float32(np.inf)),
                           p * np.float32(1.5), np.float32([np.finfo(np.float32).max])])
    amax = amax[(amax > 0) & np.isfinite(amax)]
    rng = np.random.default_rng(2)
    x = (rng.uniform(-1, 1, (amax.size, 32)) * amax[:, None]).astype(np.float32)
    x[np.arange(amax.size), rng.integers(0, 32, amax.size)] = amax * rng.choice([-1, 1], amax.size)
    assert_matches_ggml(require_oracle, x, "MXFP4", None, "MXFP4 powers of two")
    assert_matches_ggml(require_oracle, x.reshape(1, -1), "MXFP4", None, "MXFP4 powers of two, one long row")


@pytest.mark.oracle
def test_odd_shapes_match_ggml(require_oracle):
    rng = np.random.default_rng(11)
    for rows, cols in ((1, 32), (1, 4096), (333, 32), (17, 96)):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        assert_matches_ggml(require_oracle, x, "MXFP4", None, f"MXFP4 {rows}x{cols}")


def test_e8m0_half_matches_gguf_for_every_byte():
    e = np.arange(256, dtype=np.uint8)
    ref = GgufMXFP4.e8m0_to_fp32_half(e)
    ours = np.array([mxfp4.e8m0_to_fp32_half(np.uint8(v)) for v in e], dtype=np.float32)
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_dequantize_random_bytes_matches_gguf():
    """Every E8M0 exponent byte and nibble pattern decodes bit-for-bit as gguf does."""
    qt = get_qtype("MXFP4")
    rng = np.random.default_rng(5)
    rows, cols = 64, 32 * 64
    raw = rng.integers(0, 256, (rows, qt.row_bytes(cols)), dtype=np.uint8)
    raw.reshape(-1, qt.type_size)[:256, 0] = np.arange(256)
    with np.errstate(all="ignore"):
        ours = quant.dequantize(raw, "MXFP4", (rows, cols))
        ref = gguf_dequant(raw, "MXFP4").reshape((rows, cols))
    assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))


def test_known_block_layout():
    """Weights on the E2M1 grid times 2^-3: e = floor(log2(6 * 2^-3)) - 2 + 127 = 124, decode is exact."""
    levels = mxfp4._KV / np.float32(2.0)  # E2M1 values 0, 0.5, ..., 6 and their negatives
    x = (np.concatenate([levels, levels[::-1]]) * np.float32(2.0**-3))[None, :].astype(np.float32)
    raw = quant.quantize(x, "MXFP4")[0]
    assert raw[0] == 124
    assert np.array_equal(quant.dequantize(raw[None, :], "MXFP4", x.shape), x)
    assert raw[1] & 0x0F == 0  # +0 takes index 0, not -0's index 8 (first minimum wins)


def test_imatrix_is_ignored_and_threads_do_not_matter():
    x = make_family("heavy_tail", 37, 1024, block=32)
    a = quant.quantize(x, "MXFP4")
    assert np.array_equal(a, quant.quantize(x, "MXFP4", imatrix=make_imatrix("positive", 1024)))
    with quant.threads(1):
        assert np.array_equal(a, quant.quantize(x, "MXFP4"))
    assert np.array_equal(a[5:9], quant.quantize(x[5:9], "MXFP4"))


def test_fast_level_search_equals_ggml_loop():
    """The 8-level search the kernel uses gives ggml's 16-level best_index_mxfp4 on every kind of value and scale."""
    from numba import njit

    @njit(cache=False)
    def both(xs, es, val):
        kd = np.empty(8, np.float32)
        bad = 0
        for e in es:
            d = mxfp4.e8m0_to_fp32_half(e)
            for k in range(8):
                kd[k] = val[k] * d
            for x in xs:
                if mxfp4.best_index_mxfp4(val, x, d) != mxfp4._best_index_fast(kd, x):
                    bad += 1
        return bad

    rng = np.random.default_rng(4)
    es = np.arange(256).astype(np.int64)
    mids = np.float32([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7, 100])  # exact midpoints between levels (times d)
    xs = np.concatenate([rng.standard_normal(300), mids, -mids, [0.0, -0.0]]).astype(np.float32)
    assert both(xs, es[:2], mxfp4._KV) == 0
    for e in (0, 1, 2, 100, 127, 200, 252, 255):
        d = np.float32(mxfp4.e8m0_to_fp32_half(e))
        scaled = xs.astype(np.float64) * d
        scaled = scaled[np.abs(scaled) < 3e38].astype(np.float32)  # finite inputs only (the API refuses Inf)
        near = np.nextafter(scaled, np.float32(np.inf) * np.sign(scaled + np.float32(1e-45)))
        assert both(np.concatenate([scaled, near]).astype(np.float32), np.array([e]), mxfp4._KV) == 0
