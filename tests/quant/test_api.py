"""quant.quantize / quant.dequantize input validation: clear errors that name the tensor, accepted input forms."""
from __future__ import annotations

import numpy as np
import pytest

import quant
from core.errors import (
    ImatrixRequiredError,
    NonFiniteError,
    QuantGateError,
    ShapeError,
    UnsupportedTypeError,
)
from quant.formats import QTYPE_NAMES, get_qtype
from quant.imatrix_policy import KERNEL_REQUIRES_IMATRIX

NAME = "blk.3.attn_q.weight"


@pytest.fixture
def x() -> np.ndarray:
    return np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "F16"])
def test_non_finite_input_names_tensor_and_position(x, qtype, bad):
    x[2, 17] = bad
    with pytest.raises(NonFiniteError) as ei:
        quant.quantize(x, qtype, name=NAME)
    msg = str(ei.value)
    assert NAME in msg and "(2, 17)" in msg
    assert ("1 NaN" in msg) if np.isnan(bad) else ("1 Inf" in msg)


def test_non_finite_without_name_still_clear(x):
    x[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="input contains 1 NaN"):
        quant.quantize(x, "Q4_1")


def test_non_finite_imatrix_names_tensor(x):
    w = np.ones(256, dtype=np.float32)
    w[5] = np.inf
    with pytest.raises(NonFiniteError, match=f"imatrix of {NAME}"):
        quant.quantize(x, "Q4_0", imatrix=w, name=NAME)


def test_wrong_imatrix_length(x):
    with pytest.raises(ShapeError, match=r"255 entries, expected one per column \(256\)") as ei:
        quant.quantize(x, "Q5_0", imatrix=np.ones(255, dtype=np.float32), name=NAME)
    assert NAME in str(ei.value)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q5_1", "Q4_K"])
def test_row_not_multiple_of_block(qtype):
    bs = get_qtype(qtype).block_size
    with pytest.raises(ShapeError, match=f"not a multiple of {qtype}'s block size {bs}"):
        quant.quantize(np.zeros((2, bs + 8), dtype=np.float32), qtype)


def test_three_dimensional_input_rejected():
    with pytest.raises(ShapeError, match="2-D"):
        quant.quantize(np.zeros((2, 2, 32), dtype=np.float32), "Q8_0", name=NAME)


def test_integer_input_rejected():
    with pytest.raises(ShapeError, match="float32"):
        quant.quantize(np.zeros((2, 32), dtype=np.int32), "Q8_0")


@pytest.mark.parametrize("name", ["Q7_0", "Q1_0", "", "f64"])
def test_unknown_or_unsupported_type(x, name):
    with pytest.raises(UnsupportedTypeError, match="supported: F32"):
        quant.quantize(x, name)


def test_errors_are_quantgate_value_errors(x):
    for exc in (NonFiniteError, ShapeError, UnsupportedTypeError):
        assert issubclass(exc, QuantGateError) and issubclass(exc, ValueError)


def test_type_name_case_insensitive(x):
    assert np.array_equal(quant.quantize(x, "q8_0"), quant.quantize(x, "Q8_0"))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"])
def test_one_dimensional_input_is_one_row(x, qtype):
    out = quant.quantize(x[1], qtype)
    assert out.shape == (1, get_qtype(qtype).row_bytes(256))
    assert np.array_equal(out[0], quant.quantize(x, qtype)[1])


def test_float64_and_strided_input_accepted(x):
    ref = quant.quantize(x, "Q4_1")
    assert np.array_equal(quant.quantize(x.astype(np.float64), "Q4_1"), ref)
    xt = np.asfortranarray(x)
    assert np.array_equal(quant.quantize(xt, "Q4_1"), ref)
    wide = np.zeros((4, 512), dtype=np.float32)
    wide[:, ::2] = x
    assert np.array_equal(quant.quantize(wide[:, ::2], "Q4_1"), ref)


def test_every_type_runs_with_and_without_imatrix(x):
    w = np.linspace(0.1, 2, 256, dtype=np.float32)
    for qtype in QTYPE_NAMES:
        qt = get_qtype(qtype)
        cols = max(256, qt.block_size)
        xx = np.resize(x, (4, cols)).astype(np.float32)
        ww = np.resize(w, cols).astype(np.float32)
        for imatrix in (None, ww):
            if imatrix is None and qtype in KERNEL_REQUIRES_IMATRIX:
                with pytest.raises(ImatrixRequiredError):
                    quant.quantize(xx, qtype)
                continue
            out = quant.quantize(xx, qtype, imatrix=imatrix)
            assert out.shape == (4, qt.row_bytes(cols)) and out.dtype == np.uint8, qtype
            y = quant.dequantize(out, qtype, xx.shape)
            assert y.shape == xx.shape and np.isfinite(y).all(), qtype


def test_dequantize_byte_count_mismatch():
    raw = np.zeros(34 * 3, dtype=np.uint8)
    with pytest.raises(ShapeError, match="102 bytes does not match shape"):
        quant.dequantize(raw, "Q8_0", (2, 64))


def test_dequantize_empty_shape():
    with pytest.raises(ShapeError, match="non-empty shape"):
        quant.dequantize(np.zeros(34, dtype=np.uint8), "Q8_0", ())


def test_dequantize_nd_shape_and_flat_bytes(x):
    raw = quant.quantize(x, "Q8_0")
    y = quant.dequantize(raw.reshape(-1), "Q8_0", (2, 2, 256))
    assert y.shape == (2, 2, 256)
    assert np.array_equal(y.reshape(4, 256), quant.dequantize(raw, "Q8_0", (4, 256)))
