"""Per-tensor weight error: formulas vs numpy, and every tensor of a real quantized file."""
from __future__ import annotations

import math

import numpy as np
import pytest

from tests.validation._tiny import tiny_ggufs, tiny_model  # noqa: F401  (fixtures)
from validation.tensor_error import per_tensor_errors, tensor_error


def test_values_match_numpy():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(64, 96)).astype(np.float32)
    c = (r + rng.normal(scale=0.05, size=r.shape)).astype(np.float32)
    e = tensor_error(r, c, name="w", qtype="Q4_0", nbytes=64 * 96 // 32 * 18)
    d = c.astype(np.float64) - r
    assert e.mse == pytest.approx(np.mean(d ** 2), rel=1e-12)
    assert e.rel_rmse == pytest.approx(np.sqrt(np.sum(d ** 2) / np.sum(r.astype(np.float64) ** 2)), rel=1e-12)
    cos = np.dot(r.ravel().astype(np.float64), c.ravel()) / (np.linalg.norm(r.astype(np.float64)) * np.linalg.norm(c.astype(np.float64)))
    assert e.cosine == pytest.approx(cos, rel=1e-12)
    assert e.max_abs_error == pytest.approx(np.abs(d).max(), rel=1e-12)
    assert e.bits_per_weight == 4.5 and e.n_elements == 64 * 96 and e.shape == [64, 96]


def test_zero_reference():
    z = np.zeros(8, np.float32)
    e = tensor_error(z, z)
    assert (e.mse, e.rel_rmse, e.cosine, e.max_abs_error) == (0.0, None, None, 0.0)
    assert math.isnan(e.bits_per_weight)
    with pytest.raises(ValueError):
        tensor_error(z, np.zeros(9, np.float32))


def test_every_tensor_of_quantized_files(tiny_model, tiny_ggufs):  # noqa: F811
    f16 = per_tensor_errors(tiny_model, tiny_ggufs["F16"])
    q8 = per_tensor_errors(tiny_model, tiny_ggufs["Q8_0"])
    q2 = {e.name: e for e in per_tensor_errors(tiny_model, tiny_ggufs["Q2_K"])}
    assert len(f16) == len(q8) == len(q2) == 2 * 9 + 3
    assert all(e.mse == 0.0 and e.cosine == 1.0 for e in f16)     # F16 source stored as F16: lossless
    for e in q8:
        if e.qtype == "Q8_0":
            assert e.bits_per_weight == 8.5 and 0 < e.rel_rmse < 0.01
            assert e.rel_rmse < q2[e.name].rel_rmse
    assert q2["blk.0.ffn_gate.weight"].qtype == "Q2_K"
    assert q2["blk.0.ffn_gate.weight"].bits_per_weight == pytest.approx(2.625)
