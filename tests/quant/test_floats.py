"""F32/F16/BF16: conversions byte-identical to ggml_quantize_chunk, decoding equal to gguf.quants."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quant
from quant.formats import get_qtype
from quant.kernels import floats
from tests.quant.kernel_cases import FAMILIES, assert_blocks_equal, make_family

TYPES = ("F32", "F16", "BF16")


def _bit_sweep() -> np.ndarray:
    """~1.3M float32 bit patterns: a stride over all 2^32 (every exponent, NaN/Inf included) plus every pattern
    within +-2 ulp of each fp16 and bf16 rounding tie and of the fp16 overflow/underflow edges."""
    stride = np.arange(0, 1 << 32, 4099, dtype=np.uint64)
    hi = np.arange(1 << 16, dtype=np.uint64) << np.uint64(16)  # every bf16 value; ties sit at +0x8000
    bf_ties = (hi[:, None] + np.uint64(0x8000) + np.arange(-2, 3, dtype=np.int64).astype(np.uint64)[None, :])
    h = np.arange(1 << 15, dtype=np.uint16).view(np.float16).astype(np.float32)  # non-negative halves
    h = h[np.isfinite(h)]
    with np.errstate(over="ignore"):
        nxt = np.nextafter(h.astype(np.float16), np.float16(np.inf)).astype(np.float32)
    mids = ((h.astype(np.float64) + nxt.astype(np.float64)) / 2).astype(np.float32).view(np.uint32)
    f16_ties = mids.astype(np.int64)[:, None] + np.arange(-2, 3)[None, :]
    edges = np.array([65504.0, 65519.996, 65520.0, 65520.004, 65536.0, 2.0**-24, 2.0**-25, 2.0**-26, 6.1e-5],
                     dtype=np.float32).view(np.uint32)
    u = np.concatenate([
        stride, bf_ties.reshape(-1) & np.uint64(0xFFFFFFFF), f16_ties.reshape(-1).astype(np.uint64), edges,
    ]).astype(np.uint32)
    u = np.concatenate([u, u | np.uint32(0x80000000)])
    u = u[: u.size // 64 * 64]
    return u.view(np.float32).reshape(-1, 64)


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_bit_sweep_matches_ggml(require_oracle, qtype):
    """Kernel-level (NaN/Inf allowed here; quant.quantize refuses them): rounding, overflow, subnormals, NaN rule."""
    x = _bit_sweep()
    with np.errstate(all="ignore"):
        ours = floats.KERNELS[qtype][0](x, None)
        ref = require_oracle.ggml_quantize(x, qtype)
    assert_blocks_equal(ours, ref, get_qtype(qtype).type_size, f"{qtype} bit sweep")


@pytest.mark.oracle
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", TYPES)
def test_families_match_ggml(require_oracle, qtype, family):
    x = make_family(family, 40, 8192, block=32)
    w = np.linspace(0, 3, 8192, dtype=np.float32)  # ignored by ggml for float types
    with np.errstate(all="ignore"):
        ours = quant.quantize(x, qtype, imatrix=w)
        ref = require_oracle.ggml_quantize(x, qtype, w)
    assert_blocks_equal(ours, ref, get_qtype(qtype).type_size, f"{qtype}/{family}")


def test_f16_nan_rule():
    """ggml writes every NaN as sign | 0x7E00 (payload dropped), unlike a plain numpy cast."""
    nan_bits = np.array([0x7FC00000, 0x7F800001, 0xFFC00123, 0x7FFFFFFF], dtype=np.uint32)
    h = floats.quantize_f16(nan_bits.view(np.float32).reshape(1, -1)).view(np.uint16)[0]
    assert h.tolist() == [0x7E00, 0x7E00, 0xFE00, 0x7E00]


def test_bf16_rounding_and_nan_rule():
    bits = np.array([0x3F808000, 0x3F818000, 0x3F808001, 0x7F7FFFFF, 0x7F800001, 0xFF812345], dtype=np.uint32)
    h = floats.quantize_bf16(bits.view(np.float32).reshape(1, -1)).view(np.uint16)[0]
    # tie to even (down), tie to even (up), above tie, FLT_MAX -> Inf, NaN quieted keeping the top payload bits
    assert h.tolist() == [0x3F80, 0x3F82, 0x3F81, 0x7F80, 0x7FC0, 0xFFC1]


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_random_bytes_matches_gguf(qtype):
    rng = np.random.default_rng(5)
    rows, cols = 32, 1024
    raw = rng.integers(0, 256, (rows, get_qtype(qtype).row_bytes(cols)), dtype=np.uint8)
    ours = quant.dequantize(raw, qtype, (rows, cols))
    ref = gguf_quants.dequantize(raw, GGMLQuantizationType[qtype]).reshape(rows, cols)
    assert ours.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))


_mats = hnp.arrays(
    np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 96])),
    elements=st.floats(-60000, 60000, width=32),
)


@settings(max_examples=60, deadline=None)
@given(x=_mats, qtype=st.sampled_from(TYPES))
def test_roundtrip_relative_error(x, qtype):
    raw = quant.quantize(x, qtype)
    assert raw.shape == (x.shape[0], get_qtype(qtype).row_bytes(x.shape[1]))
    y = quant.dequantize(raw, qtype, x.shape)
    assert y.shape == x.shape and y.dtype == np.float32
    rel = {"F32": 0.0, "F16": 2.0**-11, "BF16": 2.0**-8}[qtype]
    tiny = {"F32": 0.0, "F16": 2.0**-25, "BF16": 2.0**-134}[qtype]  # half of each format's subnormal step
    err = np.abs(x.astype(np.float64) - y)
    assert (err <= np.abs(x.astype(np.float64)) * rel + tiny).all()
    assert np.array_equal(quant.quantize(x, qtype), raw)


def test_widen_to_f32_exact_for_every_half_and_bf16_pattern():
    from quant.kernels.floats import widen_to_f32

    bits = np.arange(65536, dtype=np.uint16)
    got = widen_to_f32(bits, "F16")
    ref = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    assert np.array_equal(got.view(np.uint32)[~nan], ref.view(np.uint32)[~nan])  # zeros, subnormals, Inf too
    assert np.isnan(got[nan]).all()
    bf = widen_to_f32(bits, "BF16")
    assert np.array_equal(bf.view(np.uint32), bits.astype(np.uint32) << 16)
    out = np.empty(65536, np.float32)
    assert widen_to_f32(bits.view(np.uint8), "F16", out) is out


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, np.float32(np.nan) * -1])
def test_all_finite_f32_finds_every_non_finite_pattern(bad):
    """The numba finite check agrees with np.isfinite: extremes, -0.0 and subnormals are finite, NaN/+-Inf not."""
    x = np.array([np.finfo(np.float32).max, -np.finfo(np.float32).max, -0.0, 1e-45, 1.0] * 7, np.float32)
    assert floats.all_finite_f32(x)
    for pos in (0, 17, x.size - 1):
        y = x.copy()
        y[pos] = bad
        assert not floats.all_finite_f32(y) and not np.isfinite(y).all()
