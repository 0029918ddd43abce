"""TQ1_0/TQ2_0: every block byte-identical to ggml_quantize_chunk (which ignores the imatrix), dequantize equal to
gguf.quants, lroundf equal to the C library's."""
from __future__ import annotations

import ctypes
import ctypes.util

import numpy as np
import pytest
from numba import njit

import quant
from quant.formats import get_qtype
from quant.kernels import ternary
from tests.quant.kernel_cases import (
    FAMILIES,
    IMATRIX,
    assert_matches_ggml,
    gguf_dequant,
    make_family,
    make_imatrix,
    same_floats,
)

TYPES = ("TQ1_0", "TQ2_0")
# 3,456 super-blocks per call; three imatrix variants (each with its own data seed) give 10,368 per type and family
ROWS, COLS = 24, 256 * 144
D_OFFSET = {"TQ1_0": 52, "TQ2_0": 64}


@pytest.mark.oracle
@pytest.mark.parametrize("imatrix_kind", IMATRIX)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", TYPES)
def test_matches_ggml(require_oracle, qtype, family, imatrix_kind):
    x = make_family(family, ROWS, COLS, seed=IMATRIX.index(imatrix_kind))
    w = make_imatrix(imatrix_kind, COLS)
    assert_matches_ggml(require_oracle, x, qtype, w, f"{qtype}/{family}/imatrix={imatrix_kind}")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_exact_halves_and_odd_shapes_match_ggml(require_oracle, qtype):
    """x/d exactly +-0.5 (lroundf rounds away from zero), ternary-valued blocks, one row, many short rows."""
    rng = np.random.default_rng(3)
    halves = rng.choice(np.float32([-2, -1, 0, 1, 2]), (64, 256)).astype(np.float32)
    halves[:, 0] = 2  # amax 2: +-1 -> +-0.5
    ternary_vals = rng.choice(np.float32([-1, 0, 1]), (64, 512)).astype(np.float32) * np.float32(0.37)
    for x in (halves, ternary_vals, rng.standard_normal((1, 4096)).astype(np.float32),
              rng.standard_normal((333, 256)).astype(np.float32)):
        assert_matches_ggml(require_oracle, x, qtype, None, f"{qtype} {x.shape}")


@njit(cache=True)
def _lround_many(x):
    out = np.empty(x.size, np.int64)
    for i in range(x.size):
        out[i] = ternary.lroundf(x[i])
    return out


def test_lroundf_matches_libm():
    """Our lroundf against the C library's on random bit patterns, halves and specials."""
    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    libm.lroundf.restype = ctypes.c_long
    libm.lroundf.argtypes = [ctypes.c_float]
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 20_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.float32([0.5, -0.5, 1.5, -1.5, 2.5, 0.49999997, -0.49999997, 1.0000001, 8388607.5, 2.0**62,
                          -(2.0**63), 2.0**63, 1e30, -1e30, np.inf, -np.inf, np.nan, 0.0, -0.0, 1e-45])
    xs = np.concatenate([bits, special, rng.uniform(-3, 3, 20_000).astype(np.float32)])
    ours = _lround_many(xs)
    with np.errstate(all="ignore"):
        ref = np.array([libm.lroundf(float(v)) for v in xs], dtype=np.int64)
    assert np.array_equal(ours, ref)


@pytest.mark.parametrize("finite_scales", [True, False])
@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_random_bytes_matches_gguf(qtype, finite_scales):
    """Arbitrary bytes (TQ1_0 bytes > 242 included) decode exactly as gguf does."""
    qt = get_qtype(qtype)
    rng = np.random.default_rng(5)
    rows, cols = 32, 16 * 256
    raw = rng.integers(0, 256, (rows, qt.row_bytes(cols)), dtype=np.uint8)
    if finite_scales:
        raw.reshape(-1, qt.type_size)[:, D_OFFSET[qtype] + 1] &= 0x7B
    with np.errstate(all="ignore"):
        ours = quant.dequantize(raw, qtype, (rows, cols))
        ref = gguf_dequant(raw, qtype).reshape((rows, cols))
    if finite_scales:
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    else:
        assert same_floats(ours, ref)


@pytest.mark.parametrize("qtype", TYPES)
def test_ternary_weights_round_trip_exactly(qtype):
    """Weights already in {-a, 0, a}: decoding gives them back exactly when a is an fp16 value."""
    rng = np.random.default_rng(9)
    x = rng.choice(np.float32([-1, 0, 1]), (8, 1024)).astype(np.float32) * np.float32(0.5)
    x[:, ::256] = 0.5  # every block has amax 0.5
    raw = quant.quantize(x, qtype)
    assert np.array_equal(quant.dequantize(raw, qtype, x.shape), x)
    assert np.array_equal(gguf_dequant(raw, qtype).reshape(x.shape), x)


def test_tq2_0_known_block_layout():
    """qs[m] packs weights m, m+32, m+64, m+96 (2 bits each, trit + 1), d at byte 64."""
    x = np.zeros(256, np.float32)
    x[0], x[32], x[64], x[96], x[128] = 1.0, -1.0, 0.0, 1.0, -1.0
    raw = quant.quantize(x[None, :], "TQ2_0")[0]
    assert raw[64:66].view(np.float16)[0] == 1.0
    assert raw[0] == 2 | (0 << 2) | (1 << 4) | (2 << 6)
    assert raw[32] == 0 | (1 << 2) | (1 << 4) | (1 << 6)
    assert (raw[1:32] == 0x55).all()


def test_tq1_0_known_block_layout():
    """Byte m of qs holds weights m, m+32, ..., m+128 as base-3 digits (first = most significant), scaled by
    256/243 rounding up; the last 16 weights sit 4 per byte in qh with a zero fifth trit."""
    x = np.zeros(256, np.float32)
    x[0] = 1.0  # trits of byte 0: 2,1,1,1,1 -> 2*81+27+9+3+1 = 202
    x[240] = -1.0  # qh[0]: trits 0,1,1,1 then *3 -> (0*27+9+3+1)*3 = 39
    raw = quant.quantize(x[None, :], "TQ1_0")[0]
    assert raw[0] == (202 * 256 + 242) // 243
    assert raw[1] == (121 * 256 + 242) // 243  # all zeros: trit 1 five times = 121
    assert raw[48] == (39 * 256 + 242) // 243
    assert raw[52:54].view(np.float16)[0] == 1.0


@pytest.mark.parametrize("qtype", TYPES)
def test_imatrix_is_ignored_and_threads_do_not_matter(qtype):
    x = make_family("heavy_tail", 37, 1024)
    w = make_imatrix("positive", 1024)
    a = quant.quantize(x, qtype)
    assert np.array_equal(a, quant.quantize(x, qtype, imatrix=w))
    with quant.threads(1):
        assert np.array_equal(a, quant.quantize(x, qtype))
    assert np.array_equal(a[5:9], quant.quantize(x[5:9], qtype))


def test_kernel_table_contract():
    assert set(ternary.KERNELS) == set(TYPES)
    x = make_family("normal", 3, 512)
    for name, (q, dq) in ternary.KERNELS.items():
        raw = q(x, None)
        assert raw.dtype == np.uint8 and raw.shape == (3, get_qtype(name).row_bytes(512)) and raw.flags.c_contiguous
        assert dq(raw, 512).shape == x.shape


@njit(cache=True)
def _trit_many(x):
    out = np.empty(x.size, np.int64)
    for i in range(x.size):
        out[i] = ternary._trit(x[i])
    return out


def test_trit_shortcut_equals_lroundf_plus_one():
    """The kernel's |v| < 1.5 comparisons give (lroundf(v) + 1) mod 2^32 for every kind of value."""
    rng = np.random.default_rng(1)
    edges = np.float32([0.5, 1.5, 0.49999997, 1.4999999, 1.5000001, 2.5, 0.0, 1e-45])
    xs = np.concatenate([edges, -edges, np.nextafter(edges, np.float32(np.inf)), rng.uniform(-3, 3, 50_000),
                         np.float32([np.inf, -np.inf, np.nan, 3e38, -3e38])]).astype(np.float32)
    assert np.array_equal(_trit_many(xs), (_lround_many(xs) + 1) & 0xFFFFFFFF)
