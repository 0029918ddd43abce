"""IQ4_NL/IQ4_XS: every block byte-identical to ggml_quantize_chunk (with and without an imatrix), dequantize equal
to gguf.quants."""
from __future__ import annotations

import numpy as np
import pytest

import quant
from quant.formats import get_qtype
from quant.kernels import iquants_nl
from tests.quant.kernel_cases import (
    FAMILIES,
    IMATRIX,
    assert_matches_ggml,
    gguf_dequant,
    make_family,
    make_imatrix,
    same_floats,
)

TYPES = ("IQ4_NL", "IQ4_XS")
# 3,456 blocks per call; three imatrix variants (each with its own data seed) give 10,368 per type and family
SHAPES = {"IQ4_NL": (24, 32 * 144), "IQ4_XS": (24, 256 * 144)}
FP16_OFFSET = 0  # both store d first


@pytest.mark.oracle
@pytest.mark.parametrize("imatrix_kind", IMATRIX)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", TYPES)
def test_matches_ggml(require_oracle, qtype, family, imatrix_kind):
    rows, cols = SHAPES[qtype]
    x = make_family(family, rows, cols, seed=IMATRIX.index(imatrix_kind), block=get_qtype(qtype).block_size)
    w = make_imatrix(imatrix_kind, x.shape[1])
    assert_matches_ggml(require_oracle, x, qtype, w, f"{qtype}/{family}/imatrix={imatrix_kind}")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_odd_shapes_and_imatrix_extremes_match_ggml(require_oracle, qtype):
    """One block, one row, many short rows (uneven across threads); all-zero and huge imatrix values."""
    rng = np.random.default_rng(11)
    bs = get_qtype(qtype).block_size
    for rows, cols in ((1, bs), (1, 4096), (333, bs), (17, 3 * bs)):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        for w in (None, rng.uniform(0, 2, cols).astype(np.float32), np.zeros(cols, np.float32),
                  np.full(cols, 1e30, np.float32)):
            assert_matches_ggml(require_oracle, x, qtype, w, f"{qtype} {rows}x{cols}")


@pytest.mark.parametrize("finite_scales", [True, False])
@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_random_bytes_matches_gguf(qtype, finite_scales):
    """Arbitrary block bytes decode exactly as gguf does (finite fp16 d bit-for-bit; with Inf/NaN d, NaN = NaN)."""
    qt = get_qtype(qtype)
    rng = np.random.default_rng(5)
    rows, cols = 32, 16 * 256
    raw = rng.integers(0, 256, (rows, qt.row_bytes(cols)), dtype=np.uint8)
    if finite_scales:
        raw.reshape(-1, qt.type_size)[:, FP16_OFFSET + 1] &= 0x7B  # exponent field != 31
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
    x = make_family("heavy_tail", 8, 8 * 256)
    for w in (None, make_imatrix("with_zeros", x.shape[1])):
        raw = quant.quantize(x, qtype, imatrix=w)
        ours = quant.dequantize(raw, qtype, x.shape)
        assert np.array_equal(ours.view(np.uint32), gguf_dequant(raw, qtype).reshape(x.shape).view(np.uint32))


def test_best_index_int8_is_nearest_level_ties_up():
    """best_index_int8 = the nearest of the 16 levels; an exact midpoint goes to the upper level."""
    val = iquants_nl._KV
    levels = val.astype(np.float64)
    mids = (levels[:-1] + levels[1:]) / 2
    xs = np.concatenate([np.linspace(-140, 130, 2701), mids, levels]).astype(np.float32)
    for x in xs:
        d = np.abs(levels - np.float64(x))
        want = int(np.flatnonzero(d == d.min())[-1])
        assert iquants_nl.best_index_int8(val, x) == want, x


def test_iq4_nl_known_block_layout():
    """The 16 levels twice, times 0.01: d = 0.01 (fp16), nibble j = level j (qs[j] = j | j << 4)."""
    s = np.float32(0.01)
    x = (np.tile(iquants_nl._KV, 2) * s)[None, :]
    raw = quant.quantize(x, "IQ4_NL")[0]
    assert raw[:2].view(np.float16)[0] == np.float16(s)
    assert raw[2:].tolist() == [j | (j << 4) for j in range(16)]
    y = quant.dequantize(raw[None, :], "IQ4_NL", x.shape)
    assert np.allclose(y, x, rtol=1e-3)


def test_iq4_xs_known_block_layout():
    """Eight equal blocks: every 6-bit block scale is level -32 (stored 0), d = fp16(-s/32)."""
    s = np.float32(0.01)
    x = (np.tile(iquants_nl._KV, 16) * s)[None, :]
    raw = quant.quantize(x, "IQ4_XS")[0]
    assert raw[:2].view(np.float16)[0] == np.float16(-s / np.float32(32))
    assert raw[2:8].tolist() == [0] * 6  # scales_h, scales_l
    assert raw[8:].tolist() == [j | (j << 4) for j in range(16)] * 8
    assert np.allclose(quant.dequantize(raw[None, :], "IQ4_XS", x.shape), x, rtol=1e-3)


@pytest.mark.parametrize("qtype", TYPES)
def test_imatrix_path_is_taken(qtype):
    x = make_family("heavy_tail", 16, 4 * 256)
    w = make_imatrix("positive", x.shape[1])
    assert not np.array_equal(quant.quantize(x, qtype, imatrix=w), quant.quantize(x, qtype))


@pytest.mark.parametrize("qtype", TYPES)
def test_zero_rows(qtype):
    """All-zero input: d = 0 (IQ4_XS: -0.0, from -max_scale/32) and every nibble is level 8 (value 1 * 0)."""
    x = np.zeros((2, 512), np.float32)
    raw = quant.quantize(x, qtype).reshape(-1, get_qtype(qtype).type_size)
    assert (raw[:, 0] == 0).all() and (raw[:, 1] == (0x80 if qtype == "IQ4_XS" else 0)).all()
    assert (raw[:, -16:] == 0x88).all()
    assert (quant.dequantize(raw.reshape(2, -1), qtype, x.shape) == 0).all()


@pytest.mark.parametrize("qtype", TYPES)
def test_deterministic_across_threads(qtype):
    x = make_family("normal", 37, 1024)
    w = make_imatrix("with_zeros", 1024)
    a = quant.quantize(x, qtype, imatrix=w)
    with quant.threads(1):
        b = quant.quantize(x, qtype, imatrix=w)
    assert np.array_equal(a, b)
    assert np.array_equal(a[5:9], quant.quantize(x[5:9], qtype, imatrix=w))  # rows are independent


def test_kernel_table_contract():
    assert set(iquants_nl.KERNELS) == set(TYPES)
    x = make_family("normal", 3, 512)
    for name, (q, dq) in iquants_nl.KERNELS.items():
        raw = q(x, None)
        assert raw.dtype == np.uint8 and raw.shape == (3, get_qtype(name).row_bytes(512)) and raw.flags.c_contiguous
        assert dq(raw, 512).shape == x.shape
