"""Q2_K..Q6_K: every block byte-identical to ggml_quantize_chunk (ref and imatrix paths), dequantize equal to gguf."""
from __future__ import annotations

import numpy as np
import pytest
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from numba import njit

import quant
from quant.formats import get_qtype
from quant.kernels import kquants
from quant.kernels.common import fp16_bits_to_fp32, fp32_to_fp16_bits, nearest_int

TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
QK_K = 256
# 3,456 super-blocks per call; three imatrix variants (each with its own data seed) give 10,368 per type and family
ROWS, COLS = 24, QK_K * 144
FAMILIES = (
    "normal", "zeros", "constant", "tiny", "huge", "heavy_tail", "outlier", "mixed_scale", "subnormal", "near_max",
    "one_signed", "sparse",
)
IMATRIX = ("none", "positive", "with_zeros")
FP16_OFFSETS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def make_family(family: str, rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """A (rows, cols) float32 test matrix of one input family (deterministic per seed)."""
    rng = np.random.default_rng([seed, FAMILIES.index(family), 7])
    g = rng.standard_normal((rows, cols))
    nsub = rows * cols // 16
    if family == "normal":
        x = g * 0.02
    elif family == "zeros":  # zero rows, zero super-blocks and zero 16/32-sub-blocks inside live blocks
        x = g.copy()
        x[: rows // 4] = 0
        x.reshape(-1, QK_K)[rng.random(rows * cols // QK_K) < 0.3] = 0
        x.reshape(-1, 16)[rng.random(nsub) < 0.3] = 0
    elif family == "constant":  # constant super-blocks (upper half), constant 16-sub-blocks (lower half)
        x = np.empty((rows, cols))
        h = rows // 2
        x[:h] = np.repeat(rng.uniform(-3, 3, (h * cols // QK_K, 1)), QK_K, axis=1).reshape(h, cols)
        x[h:] = np.repeat(rng.uniform(-3, 3, ((rows - h) * cols // 16, 1)), 16, axis=1).reshape(rows - h, cols)
    elif family == "tiny":
        x = g * 1e-30
    elif family == "huge":  # squares overflow float32: ggml's inf/NaN arithmetic must be followed literally
        x = g * 10.0 ** rng.uniform(20, 30, (rows, 1))
    elif family == "heavy_tail":  # student-t, df 1..3 by row
        x = rng.standard_t(np.array([1.0, 2.0, 3.0])[np.arange(rows) % 3][:, None], (rows, cols)) * 0.05
    elif family == "outlier":  # one outlier per super-block
        x = g * 0.01
        nb = rows * cols // QK_K
        idx = rng.integers(0, QK_K, nb) + np.arange(nb) * QK_K
        x.reshape(-1)[idx] = rng.choice([-1, 1], nb) * rng.uniform(1, 1000, nb)
    elif family == "mixed_scale":
        x = g * 10.0 ** rng.uniform(-8, 8, (nsub, 1)).repeat(16, axis=1).reshape(rows, cols)
    elif family == "subnormal":
        x = g * 10.0 ** rng.uniform(-45, -36, (rows, 1))
    elif family == "near_max":
        x = rng.uniform(-1, 1, (rows, cols)) * 3.4e38
    elif family == "one_signed":  # all-positive rows then all-negative rows (the min > 0 / max < 0 branches)
        x = np.abs(g) + rng.uniform(0, 2, (rows, 1))
        x[rows // 2:] *= -1
    elif family == "sparse":
        x = np.where(rng.random((rows, cols)) < 0.9, 0.0, g)
    else:
        raise ValueError(family)
    with np.errstate(over="ignore"):
        return np.ascontiguousarray(x, dtype=np.float32)


def make_imatrix(kind: str, cols: int, seed: int = 0) -> np.ndarray | None:
    """None, strictly positive, or ~30% zero per-column importances (plus whole zero 32-column runs)."""
    rng = np.random.default_rng([seed, 99, IMATRIX.index(kind)])
    if kind == "none":
        return None
    w = rng.uniform(0.01, 10.0, cols) ** 2
    if kind == "with_zeros":
        w[rng.random(cols) < 0.3] = 0.0
        w.reshape(-1, 32)[rng.random(cols // 32) < 0.1] = 0.0
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


@pytest.mark.oracle
@pytest.mark.parametrize("imatrix_kind", IMATRIX)
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("qtype", TYPES)
def test_matches_ggml(require_oracle, qtype, family, imatrix_kind):
    x = make_family(family, ROWS, COLS, seed=IMATRIX.index(imatrix_kind))
    w = make_imatrix(imatrix_kind, COLS)
    with np.errstate(all="ignore"):
        ours = quant.quantize(x, qtype, imatrix=w)
        ref = require_oracle.ggml_quantize(x, qtype, w)
    assert_blocks_equal(ours, ref, get_qtype(qtype).type_size, f"{qtype}/{family}/imatrix={imatrix_kind}")


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", TYPES)
def test_odd_shapes_and_imatrix_extremes_match_ggml(require_oracle, qtype):
    """One block, one row, many short rows; all-zero and huge imatrix values."""
    rng = np.random.default_rng(11)
    for rows, cols in ((1, 256), (1, 4096), (333, 256), (17, 768)):
        x = rng.standard_normal((rows, cols)).astype(np.float32)
        for w in (None, rng.uniform(0, 2, cols).astype(np.float32), np.zeros(cols, np.float32),
                  np.full(cols, 1e30, np.float32)):
            with np.errstate(all="ignore"):
                ours = quant.quantize(x, qtype, imatrix=w)
                ref = require_oracle.ggml_quantize(x, qtype, w)
            assert_blocks_equal(ours, ref, get_qtype(qtype).type_size, f"{qtype} {rows}x{cols}")


def _same_floats(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-equal, except that any NaN matches any NaN (payloads are not part of the format's contract)."""
    both_nan = np.isnan(a) & np.isnan(b)
    return a.shape == b.shape and bool(((a.view(np.uint32) == b.view(np.uint32)) | both_nan).all())


def _gguf_dequant(raw: np.ndarray, qtype: str, shape: tuple[int, int]) -> np.ndarray:
    return gguf_quants.dequantize(raw, GGMLQuantizationType[qtype]).reshape(shape)


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
        ref = _gguf_dequant(raw, qtype, (rows, cols))
    assert ours.dtype == np.float32 and ours.shape == (rows, cols)
    if finite_scales:
        assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32))
    else:
        assert _same_floats(ours, ref)


@pytest.mark.parametrize("qtype", TYPES)
def test_dequantize_of_quantized_matches_gguf(qtype):
    x = make_family("heavy_tail", 8, 8 * QK_K)
    for w in (None, make_imatrix("with_zeros", x.shape[1])):
        raw = quant.quantize(x, qtype, imatrix=w)
        ours = quant.dequantize(raw, qtype, x.shape)
        assert np.array_equal(ours.view(np.uint32), _gguf_dequant(raw, qtype, x.shape).view(np.uint32))


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
                          _gguf_dequant(raw[None, :], "Q4_K", (1, QK_K))[0])


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
    assert (err <= _ERR_PER_AMAX[qtype] * amax + 1e-6 * scale).all(), (err / np.maximum(amax, 1e-30)).max()


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
