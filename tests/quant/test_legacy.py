"""Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: every block byte-identical to ggml_quantize_chunk, dequantize equal to gguf.quants."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import quant
from quant.formats import get_qtype
from quant.kernels import legacy
from tests.quant.kernel_cases import (
    FAMILIES,
    IMATRIX,
    assert_matches_ggml,
    gguf_dequant,
    make_family,
    make_imatrix,
    same_floats,
)

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
ROWS, COLS = 40, 8192  # 10,240 blocks of 32 per case
@pytest.fixture(scope="module")
def family_data():
    cache: dict[str, np.ndarray] = {}

    def get(family: str) -> np.ndarray:
        if family not in cache:
            cache[family] = make_family(family, ROWS, COLS, block=32)
        return cache[family]

    return get


@pytest.mark.oracle
@pytest.mark.parametrize("imatrix_kind", IMATRIX)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", TYPES)
def test_matches_ggml(require_oracle, family_data, qtype, family, imatrix_kind):
    x = family_data(family)
    w = make_imatrix(imatrix_kind, COLS)
    assert_matches_ggml(require_oracle, x, qtype, w, f"{qtype}/{family}/imatrix={imatrix_kind}")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_odd_row_shapes_match_ggml(require_oracle, qtype):
    """One block per row, one row, and a row count that does not divide evenly among threads."""
    rng = np.random.default_rng(7)
    for rows, cols in ((1, 32), (1, 4096), (333, 32), (17, 96)):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        w = rng.uniform(0, 2, cols).astype(np.float32)
        for imatrix in (None, w):
            assert_matches_ggml(require_oracle, x, qtype, imatrix, f"{qtype} {rows}x{cols}")


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_random_bytes_matches_gguf(qtype):
    """Arbitrary block bytes (all fp16 scales incl. subnormal/Inf/NaN, all quant patterns) decode as gguf does."""
    qt = get_qtype(qtype)
    rng = np.random.default_rng(3)
    rows, cols = 64, 32 * 256
    raw = rng.integers(0, 256, (rows, qt.row_bytes(cols)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ours = quant.dequantize(raw, qtype, (rows, cols))
        ref = gguf_dequant(raw, qtype)
    assert ours.dtype == np.float32
    assert same_floats(ours, ref.reshape(rows, cols))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_of_quantized_matches_gguf(qtype):
    x = make_family("heavy_tail", 8, 2048)
    raw = quant.quantize(x, qtype)
    assert np.array_equal(quant.dequantize(raw, qtype, x.shape).view(np.uint32),
                          gguf_dequant(raw, qtype).reshape(x.shape).view(np.uint32))


@pytest.mark.parametrize("qtype", TYPES)
def test_known_block_layout(qtype):
    """A hand-checked block: ramp -16..15 (times 0.5) puts d, m, qh and nibbles where ggml-common.h says."""
    x = (np.arange(32, dtype=np.float32) - 16) * np.float32(0.5)
    raw = quant.quantize(x[None, :], qtype)[0]
    d = raw[:2].view(np.float16)[0]
    if qtype == "Q4_0":  # max |x| = 8 at x=-8 -> d = -8/-8 = 1, q = x/1 + 8.5 truncated
        assert d == 1.0
        lo = (raw[2:] & 0x0F).astype(int)
        hi = (raw[2:] >> 4).astype(int)
        assert lo.tolist() == [min(15, int(v + 8.5)) for v in x[:16]]
        assert hi.tolist() == [min(15, int(v + 8.5)) for v in x[16:]]
    elif qtype == "Q8_0":  # d = 8/127, q = round(x*127/8)
        assert d == np.float16(np.float32(8.0) / np.float32(127.0))
        assert raw[2:].view(np.int8).tolist()[0] == -127
    elif qtype in ("Q4_1", "Q5_1"):
        m = raw[2:4].view(np.float16)[0]
        assert m == -8.0
        assert d == np.float16(np.float32(15.5) / np.float32(15 if qtype == "Q4_1" else 31))
    else:  # Q5_0: d = -8/-16 = 0.5; q = x/0.5 + 16.5 -> 0..31, bit 4 in qh
        assert d == 0.5
        qh = int(raw[2:6].view(np.uint32)[0])
        q = [((raw[6 + j] & 0x0F) | (((qh >> j) & 1) << 4)) for j in range(16)]
        assert q == [min(31, int(v / 0.5 + 16.5)) for v in x[:16]]


def test_q8_0_ignores_imatrix():
    x = make_family("normal", 4, 256)
    w = np.linspace(0, 5, 256, dtype=np.float32)
    assert np.array_equal(quant.quantize(x, "Q8_0", imatrix=w), quant.quantize(x, "Q8_0"))


def test_imatrix_lowers_weighted_error():
    """The *_impl path is really taken with an imatrix, and does its job: lower importance-weighted error."""
    rng = np.random.default_rng(11)
    x = rng.standard_t(2, (64, 1024)).astype(np.float32)
    w = rng.uniform(0.1, 10, 1024).astype(np.float32)
    for qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        errs = []
        for imatrix in (None, w):
            y = quant.dequantize(quant.quantize(x, qtype, imatrix=imatrix), qtype, x.shape)
            errs.append(float((w * (x.astype(np.float64) - y) ** 2).sum()))
        assert errs[1] < 0.99 * errs[0], (qtype, errs)


# Worst-case |x - dequant(quant(x))| per unit of the block's max |x| (step/2, or a full step where the
# symmetric types clip the +8/+16 level), plus fp16 rounding of d/m; see the ref functions in ggml-quants.c.
_ERR_PER_AMAX = {"Q4_0": 1 / 8, "Q5_0": 1 / 16, "Q4_1": 1 / 15, "Q5_1": 1 / 31, "Q8_0": 1 / 254}

_blocks = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 160])),
    elements=st.floats(-1000, 1000, width=32, allow_subnormal=False),
)


@settings(max_examples=60, deadline=None)
@given(x=_blocks, qtype=st.sampled_from(TYPES))
def test_roundtrip_error_bounded(x, qtype):
    """The ref paths' provable bound (the imatrix paths are pinned byte-exact by the oracle tests instead)."""
    raw = quant.quantize(x, qtype)
    assert raw.shape == (x.shape[0], get_qtype(qtype).row_bytes(x.shape[1]))
    y = quant.dequantize(raw, qtype, x.shape)
    assert y.shape == x.shape and y.dtype == np.float32
    xb = x.reshape(-1, 32).astype(np.float64)
    err = np.abs(xb - y.reshape(-1, 32)).max(axis=1)
    amax = np.abs(xb).max(axis=1)
    bound = amax * (_ERR_PER_AMAX[qtype] + 2.0**-9) + 2.0**-17  # + 128 fp16-subnormal half-steps of d
    assert (err <= bound).all(), (qtype, err.max(), bound[np.argmax(err - bound)])


@settings(max_examples=25, deadline=None)
@given(x=_blocks, qtype=st.sampled_from(TYPES))
def test_deterministic_across_threads(x, qtype):
    w = np.abs(x[0]) + np.float32(0.1)
    a = quant.quantize(x, qtype, imatrix=w)
    with quant.api.threads(1):
        b = quant.quantize(x, qtype, imatrix=w)
    assert np.array_equal(a, b)
    assert np.array_equal(a, quant.quantize(x.copy(), qtype, imatrix=w.copy()))


def test_kernel_table_contract():
    for name, (q, dq) in legacy.KERNELS.items():
        qt = get_qtype(name)
        x = make_family("normal", 3, 96)
        raw = q(x, None)
        assert raw.dtype == np.uint8 and raw.shape == (3, qt.row_bytes(96)) and raw.flags.c_contiguous
        y = dq(raw, 96)
        assert y.dtype == np.float32 and y.shape == (3, 96)
