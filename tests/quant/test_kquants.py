"""Q2_K..Q6_K: every block byte-identical to ggml_quantize_chunk (ref and imatrix paths), dequantize equal to gguf."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numba import njit

import quant
from quant.formats import get_qtype
from quant.kernels import kquants
from quant.kernels.common import fp16_bits_to_fp32, fp32_to_fp16_bits, nearest_int
from tests.quant.kernel_cases import (
    FAMILIES,
    IMATRIX,
    assert_matches_ggml,
    gguf_dequant,
    make_family,
    make_imatrix,
    same_floats,
)

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
QK_K = 256
# 3,456 super-blocks per call; three imatrix variants (each with its own data seed) give 10,368 per type and family
ROWS, COLS = 24, QK_K * 144
FP16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


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
def test_odd_shapes_and_imatrix_extremes_match_ggml(require_oracle, qtype):
    """One block, one row, many short rows; all-zero and huge imatrix values."""
    rng = np.random.default_rng(11)
    for rows, cols in ((1, 256), (1, 4096), (333, 256), (17, 768)):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        for w in (None, rng.uniform(0, 2, cols).astype(np.float32), np.zeros(cols, np.float32),
                  np.full(cols, 1e30, np.float32)):
            assert_matches_ggml(require_oracle, x, qtype, w, f"{qtype} {rows}x{cols}")


@pytest.mark.parametrize("finite_scales", [True, False])
@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_random_bytes_matches_gguf(qtype, finite_scales):
    """Arbitrary block bytes decode exactly as gguf does (with finite fp16 scales bit-for-bit; else NaN=NaN)."""
    qt = get_qtype(qtype)
    rng = np.random.default_rng(5)
    rows, cols = 32, 16 * QK_K
    raw = rng.integers(0, 256, (rows, qt.row_bytes(cols)), dtype=np.uint8)
    if finite_scales:
        blocks = raw.reshape(-1, qt.type_size)
        for off in FP16_OFFSETS[qtype]:
            blocks[:, off + 1] &= 0x7B  # exponent field != 31: finite halves (normal and subnormal)
    with np.errstate(all="ignore"):
        ours = quant.dequantize(raw, qtype, (rows, cols))
        ref = gguf_dequant(raw, qtype).reshape((rows, cols))
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    if finite_scales:
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    else:
        assert same_floats(ours, ref)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_of_quantized_matches_gguf(qtype):
    x = make_family("heavy_tail", 8, 8 * QK_K)
    for w in (None, make_imatrix("with_zeros", x.shape[1])):
        raw = quant.quantize(x, qtype, imatrix=w)
        ours = quant.dequantize(raw, qtype, x.shape)
        assert np.array_equal(ours.view(np.uint32), gguf_dequant(raw, qtype).reshape(x.shape).view(np.uint32))


def test_kernel_table_and_row_bytes():
    assert set(kquants.KERNELS) == set(TYPES)
    x = make_family("normal", 3, 2 * QK_K)
    for qtype, (q, dq) in kquants.KERNELS.items():
        out = q(x, None)
        assert out.dtype == np.uint8 and out.shape == (3, get_qtype(qtype).row_bytes(2 * QK_K))
        assert dq(out, 2 * QK_K).shape == x.shape


@pytest.mark.parametrize("qtype", TYPES)
def test_zero_input_gives_zero_blocks(qtype):
    """All-zero weights: every scale is 0, so every byte is 0 and the decode is exactly 0."""
    x = np.zeros((2, 2 * QK_K), np.float32)
    for w in (None, np.ones(2 * QK_K, np.float32)):
        raw = quant.quantize(x, qtype, imatrix=w)
        assert not raw.any()
        assert (quant.dequantize(raw, qtype, x.shape) == 0).all()


def test_q4_k_known_block_layout():
    """A ramp 0..255 decoded by hand from ggml-common.h's block_q4_K layout (d, dmin, scales[12], qs[128])."""
    x = np.arange(QK_K, dtype=np.float32)
    raw = quant.quantize(x[None, :], "Q4_K")[0]
    d, dmin = raw[0:4].view(np.float16).astype(np.float32)
    assert dmin == 0  # every sub-block min is >= 0, so ggml clamps all mins to 0
    sc = raw[4:16].astype(int)
    for j in range(8):
        s = sc[j] & 63 if j < 4 else (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4)
        q = raw[16 + 32 * (j // 2):16 + 32 * (j // 2) + 32]
        q = (q & 0x0F) if j % 2 == 0 else (q >> 4)
        step = d * s
        assert 0 < step and np.abs(step * q - x[32 * j:32 * j + 32]).max() <= step  # within one level
    assert np.array_equal(quant.dequantize(raw[None, :], "Q4_K", (1, QK_K))[0],
                          gguf_dequant(raw[None, :], "Q4_K").reshape((1, QK_K))[0])


@pytest.mark.parametrize("qtype", TYPES)
def test_imatrix_path_is_taken(qtype):
    x = make_family("heavy_tail", 16, 4 * QK_K)
    w = make_imatrix("positive", x.shape[1])
    assert not np.array_equal(quant.quantize(x, qtype, imatrix=w), quant.quantize(x, qtype))


# --------------------------------------------------------------------------------------------- helpers


@njit(cache=True)
def _all_fp16_to_fp32():
    out = np.empty(65536, np.float32)
    for h in range(65536):
        out[h] = fp16_bits_to_fp32(np.uint16(h))
    return out


@njit(cache=True)
def _fp32_to_fp16_many(x):
    out = np.empty(x.size, np.uint16)
    for i in range(x.size):
        out[i] = fp32_to_fp16_bits(x[i])
    return out


@njit(cache=True)
def _nearest_many(x):
    out = np.empty(x.size, np.int64)
    for i in range(x.size):
        out[i] = nearest_int(x[i])
    return out


def test_fp16_conversions_match_ieee():
    """ggml's software fp16 path rounds to nearest-even like IEEE; NaN stays NaN."""
    halves = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    ref = halves.view(np.float16).astype(np.float32)
    ours = _all_fp16_to_fp32()
    nan = np.isnan(ref)
    assert np.array_equal(ours[~nan].view(np.uint32), ref[~nan].view(np.uint32)) and np.isnan(ours[nan]).all()

    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.float32([0.0, -0.0, 65504, 65519.996, 65520, 5.96e-8, 2.98e-8, 2.99e-8, 6.1e-5, 1e30, np.inf, -np.inf])
    x = np.concatenate([bits.view(np.float32), special, (rng.standard_normal(50_000) * 1e-5).astype(np.float32)])
    finite = ~np.isnan(x)
    with np.errstate(over="ignore"):
        ref16 = x[finite].astype(np.float16).view(np.uint16)
    got = _fp32_to_fp16_many(x)
    assert np.array_equal(got[finite], ref16)
    assert ((got[~finite] & 0x7FFF) == 0x7E00).all()  # ggml's canonical half NaN


def test_nearest_int_rounds_half_to_even():
    x = np.float32([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 0.49999997, 3.7, -3.7, 4194303.0, -4194303.0])
    assert _nearest_many(x).tolist() == [0, 2, 2, 0, -2, -2, 0, 4, -4, 4194303, -4194303]


# --------------------------------------------------------------------------------------------- properties

# Worst-case |x - dequant(quant(x))| per unit of the super-block's max |x|, ref path (no imatrix): about one
# quantization step of the coarsest sub-block scale (levels 3/7/15/31/63) plus 6-/8-bit scale rounding.
_ERR_PER_AMAX = {"Q2_K": 0.75, "Q3_K": 0.4, "Q4_K": 0.2, "Q5_K": 0.1, "Q6_K": 0.05}
# plus an absolute slack for tiny blocks whose fp16 d is subnormal (spacing 2^-24): up to 2^-25 * scale * level
_FP16_SUBNORMAL_SLACK = 2.0**-25 * 127 * 64

_blocks = st.integers(1, 2).flatmap(
    lambda nb: hnp.arrays(np.float32, (2, nb * QK_K), elements=st.floats(-1, 1, width=32))
)


@settings(max_examples=40, deadline=None)
@given(x=_blocks, scale=st.sampled_from([1e-2, 1.0, 3e3]), qtype=st.sampled_from(TYPES))
def test_roundtrip_error_bounded(x, scale, qtype):
    x = (x * np.float32(scale)).astype(np.float32)
    raw = quant.quantize(x, qtype)
    assert raw.dtype == np.uint8 and raw.shape == (2, get_qtype(qtype).row_bytes(x.shape[1]))
    y = quant.dequantize(raw, qtype, x.shape)
    assert y.dtype == np.float32 and y.shape == x.shape and np.isfinite(y).all()
    amax = np.abs(x).reshape(-1, QK_K).max(axis=1)
    err = np.abs(y - x).reshape(-1, QK_K).max(axis=1)
    assert (err <= _ERR_PER_AMAX[qtype] * amax + _FP16_SUBNORMAL_SLACK).all(), (err / np.maximum(amax, 1e-30)).max()


@settings(max_examples=25, deadline=None)
@given(x=_blocks, qtype=st.sampled_from(TYPES), seed=st.integers(0, 2**16))
def test_rows_independent_and_deterministic(x, qtype, seed):
    """Each row is quantized on its own (any row split, any thread count gives the same bytes)."""
    w = np.random.default_rng(seed).uniform(0, 3, x.shape[1]).astype(np.float32)
    for imatrix in (None, w):
        whole = quant.quantize(x, qtype, imatrix=imatrix)
        with quant.threads(1):
            single = quant.quantize(x, qtype, imatrix=imatrix)
        rows = np.concatenate([quant.quantize(x[i:i + 1], qtype, imatrix=imatrix) for i in range(x.shape[0])])
        assert np.array_equal(whole, single) and np.array_equal(whole, rows)
