"""Q4_0/Q4_1/Q5_0/Q5_1/Q8_0: every block byte-identical to ggml_quantize_chunk, dequantize equal to gguf.quants."""
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
from quant.kernels import legacy

TYPES = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")
ROWS, COLS = 40, 8192  # 10,240 blocks of 32 per case
FAMILIES = (
    "normal", "zeros", "constant", "tiny", "huge", "heavy_tail", "outlier", "mixed_scale", "subnormal", "near_max",
)
IMATRIX = ("none", "positive", "with_zeros")


def make_family(family: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A (rows, cols) float32 test matrix of one input family (deterministic per seed)."""
    rng = np.random.default_rng([seed, FAMILIES.index(family)])
    g = rng.standard_normal((rows, cols))
    if family == "normal":
        x = g * 0.02
    elif family == "zeros":
        x = np.zeros((rows, cols))
        x[rows // 2:, cols // 2:] = g[rows // 2:, cols // 2:]  # zero rows, zero blocks inside live rows
    elif family == "constant":
        x = np.repeat(rng.uniform(-3, 3, (rows * cols // 32, 1)), 32, axis=1).reshape(rows, cols)
    elif family == "tiny":
        x = g * 1e-30
    elif family == "huge":
        x = g * 10.0 ** rng.uniform(20, 30, (rows, 1))
    elif family == "heavy_tail":
        x = rng.standard_t(1.2, (rows, cols)) * 0.05
    elif family == "outlier":
        x = g * 0.01
        idx = rng.integers(0, 32, rows * cols // 32) + np.arange(rows * cols // 32) * 32
        x.reshape(-1)[idx] = rng.choice([-1, 1], idx.size) * rng.uniform(1, 100, idx.size)
    elif family == "mixed_scale":
        x = g * 10.0 ** rng.uniform(-8, 8, (rows * cols // 32, 1)).repeat(32, axis=1).reshape(rows, cols)
    elif family == "subnormal":  # scales whose 1/d overflows or loses bits: ggml's int casts see NaN/Inf/huge
        x = g * 10.0 ** rng.uniform(-45, -36, (rows, 1))
    elif family == "near_max":
        x = rng.uniform(-1, 1, (rows, cols)) * 3.4e38
    else:
        raise ValueError(family)
    return np.ascontiguousarray(x, dtype=np.float32)


def make_imatrix(kind: str, cols: int, seed: int = 0) -> np.ndarray | None:
    """None, strictly positive, or ~30% zero per-column importances."""
    rng = np.random.default_rng([seed, 99, IMATRIX.index(kind)])
    if kind == "none":
        return None
    w = rng.uniform(0.01, 10.0, cols) ** 2
    if kind == "with_zeros":
        w[rng.random(cols) < 0.3] = 0.0
    return w.astype(np.float32)


def assert_blocks_equal(ours: np.ndarray, ref: np.ndarray, type_size: int, what: str) -> None:
    """Every block byte-equal; otherwise say how many blocks differ and show the first."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.uint8, (what, ours.shape, ref.shape)
    a = ours.reshape(-1, type_size)
    b = ref.reshape(-1, type_size)
    bad = np.flatnonzero((a != b).any(axis=1))
    if bad.size:
        i = int(bad[0])
        pytest.fail(
            f"{what}: {bad.size} of {a.shape[0]} blocks differ from ggml; first block {i}:\n"
            f"  ours: {a[i].tolist()}\n  ggml: {b[i].tolist()}"
        )


@pytest.fixture(scope="module")
def family_data():
    cache: dict[str, np.ndarray] = {}

    def get(family: str) -> np.ndarray:
        if family not in cache:
            cache[family] = make_family(family, ROWS, COLS)
        return cache[family]

    return get


@pytest.mark.oracle
@pytest.mark.parametrize("imatrix_kind", IMATRIX)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", TYPES)
def test_matches_ggml(require_oracle, family_data, qtype, family, imatrix_kind):
    x = family_data(family)
    w = make_imatrix(imatrix_kind, COLS)
    with np.errstate(all="ignore"):
        ours = quant.quantize(x, qtype, imatrix=w)
        ref = require_oracle.ggml_quantize(x, qtype, w)
    assert_blocks_equal(ours, ref, get_qtype(qtype).type_size, f"{qtype}/{family}/imatrix={imatrix_kind}")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_odd_row_shapes_match_ggml(require_oracle, qtype):
    """One block per row, one row, and a row count that does not divide evenly among threads."""
    rng = np.random.default_rng(7)
    for rows, cols in ((1, 32), (1, 4096), (333, 32), (17, 96)):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        w = rng.uniform(0, 2, cols).astype(np.float32)
        for imatrix in (None, w):
            assert_blocks_equal(
                quant.quantize(x, qtype, imatrix=imatrix), require_oracle.ggml_quantize(x, qtype, imatrix),
                get_qtype(qtype).type_size, f"{qtype} {rows}x{cols}",
            )


def _gguf_dequant(raw: np.ndarray, qtype: str) -> np.ndarray:
    return gguf_quants.dequantize(raw, GGMLQuantizationType[qtype])


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-equal, except that any NaN matches any NaN (payloads are not part of the format's contract)."""
    a32 = a.view(np.uint32)
    b32 = b.view(np.uint32)
    both_nan = np.isnan(a) & np.isnan(b)
    return a.shape == b.shape and bool(((a32 == b32) | both_nan).all())


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_random_bytes_matches_gguf(qtype):
    """Arbitrary block bytes (all fp16 scales incl. subnormal/Inf/NaN, all quant patterns) decode as gguf does."""
    qt = get_qtype(qtype)
    rng = np.random.default_rng(3)
    rows, cols = 64, 32 * 256
    raw = rng.integers(0, 256, (rows, qt.row_bytes(cols)), dtype=np.uint8)
    with np.errstate(all="ignore"):
        ours = quant.dequantize(raw, qtype, (rows, cols))
        ref = _gguf_dequant(raw, qtype)
    assert ours.dtype == np.float32
    assert _same_floats(ours, ref.reshape(rows, cols))


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_of_quantized_matches_gguf(qtype):
    x = make_family("heavy_tail", 8, 2048)
    raw = quant.quantize(x, qtype)
    assert np.array_equal(quant.dequantize(raw, qtype, x.shape).view(np.uint32),
                          _gguf_dequant(raw, qtype).reshape(x.shape).view(np.uint32))


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


def test_imatrix_changes_legacy_result():
    """The *_impl path is really taken for Q4_0..Q5_1 when an imatrix is given."""
    x = make_family("heavy_tail", 16, 1024)
    w = make_imatrix("positive", 1024)
    for qtype in ("Q4_0", "Q4_1", "Q5_0", "Q5_1"):
        assert not np.array_equal(quant.quantize(x, qtype, imatrix=w), quant.quantize(x, qtype)), qtype


# Worst-case |x - dequant(quant(x))| per unit of the block's max |x| (step/2, or a full step where the
# symmetric types clip the +8/+16 level), plus fp16 rounding of d/m; see the ref functions in ggml-quants.c.
_ERR_PER_AMAX = {"Q4_0": 1 / 8, "Q5_0": 1 / 16, "Q4_1": 1 / 15, "Q5_1": 1 / 31, "Q8_0": 1 / 254}

_blocks = hnp.arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 160])),
    elements=st.floats(-1000, 1000, width=32, allow_subnormal=False),
)


@settings(max_examples=60, deadline=None)
@given(x=_blocks, qtype=st.sampled_from(TYPES), use_imatrix=st.booleans())
def test_roundtrip_error_bounded(x, qtype, use_imatrix):
    w = np.linspace(0.5, 2.0, x.shape[1], dtype=np.float32) if use_imatrix else None
    raw = quant.quantize(x, qtype, imatrix=w)
    assert raw.shape == (x.shape[0], get_qtype(qtype).row_bytes(x.shape[1]))
    y = quant.dequantize(raw, qtype, x.shape)
    assert y.shape == x.shape and y.dtype == np.float32
    xb = x.reshape(-1, 32).astype(np.float64)
    err = np.abs(xb - y.reshape(-1, 32)).max(axis=1)
    amax = np.abs(xb).max(axis=1)
    # the imatrix search may pick a scale up to ~1/(nmax-0.9) wider than the ref one: allow 30% slack there
    slack = 1.3 if use_imatrix and qtype != "Q8_0" else 1.0
    bound = amax * (_ERR_PER_AMAX[qtype] * slack + 2.0**-9) + 2.0**-20
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
