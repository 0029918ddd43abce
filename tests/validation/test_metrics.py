"""Metric formulas against hand-computed values and llama.cpp's percentile/median rules."""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from validation.metrics import (
    Metrics,
    MetricsAccumulator,
    kl_per_token,
    log_softmax,
    median,
    percentile,
    renormalize,
    storage_log_probs,
)


def test_kl_hand_computed():
    p = np.log([[0.5, 0.5], [1.0, 1e-300]])
    q = np.log([[0.25, 0.75], [0.5, 0.5]])
    kl = kl_per_token(p, q)
    assert kl[0] == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3), rel=1e-12)
    assert kl[1] == pytest.approx(math.log(2), rel=1e-12)


def test_kl_zero_probability_terms_are_zero():
    lb = np.array([[0.0, -np.inf]])
    lc = np.array([[-0.1, -np.inf]])
    assert kl_per_token(lb, lc)[0] == pytest.approx(0.1)


def test_percentile_and_median_follow_llama_cpp():
    v = np.array([1.0, 2.0, 3.0, 4.0])
    assert median(v) == 2.5
    assert median(np.array([1.0, 5.0, 7.0])) == 5.0
    assert percentile(v, 0.99) == pytest.approx(3.97)   # index 0.99*3 = 2.97 -> 3 + 0.97*(4-3)
    assert percentile(v, 0.5) == pytest.approx(2.5)
    assert percentile(v, 0.0) == 1.0 and percentile(v, 1.0) == 4.0


def test_accumulator_hand_computed():
    # vocab 3, two tokens; targets 0 and 2
    pb = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3]])
    pc = np.array([[0.6, 0.3, 0.1], [0.1, 0.3, 0.6]])
    t = np.array([0, 2])
    acc = MetricsAccumulator()
    acc.add(np.log(pb), np.log(pc), t)
    m = acc.result()
    nll_b = -(math.log(0.7) + math.log(0.3)) / 2
    nll_c = -(math.log(0.6) + math.log(0.6)) / 2
    kl = [sum(pb[i] * np.log(pb[i] / pc[i])) for i in range(2)]
    assert m.n_tokens == 2 and m.n_samples == 1
    assert m.ppl_baseline == pytest.approx(math.exp(nll_b))
    assert m.ppl_candidate == pytest.approx(math.exp(nll_c))
    assert m.ppl_ratio == pytest.approx(math.exp(nll_c - nll_b))
    assert m.kl_mean == pytest.approx(sum(kl) / 2)
    assert m.kl_median == pytest.approx(sum(kl) / 2)          # even count: mean of the middle two
    assert m.kl_max == pytest.approx(max(kl))
    assert m.kl_p99 == pytest.approx(min(kl) + 0.99 * (max(kl) - min(kl)))
    assert m.top1_agreement == 0.5                             # argmax 0/0 agree, 1/2 differ
    assert m.acc_baseline == 0.5 and m.acc_candidate == 1.0    # base right on token 0; cand right on both
    assert m.accuracy_drop == pytest.approx(-1.0)
    dp = [0.6 - 0.7, 0.6 - 0.3]
    assert m.delta_p_mean == pytest.approx(sum(dp) / 2)
    assert m.delta_p_rms == pytest.approx(math.sqrt((dp[0] ** 2 + dp[1] ** 2) / 2))


def test_accumulator_is_token_weighted_across_samples():
    rng = np.random.default_rng(0)
    a, whole = MetricsAccumulator(), MetricsAccumulator()
    lbs, lcs, ts = [], [], []
    for n in (3, 7):
        lb, lc = log_softmax(rng.normal(size=(n, 11))), log_softmax(rng.normal(size=(n, 11)))
        t = rng.integers(0, 11, n)
        a.add(lb, lc, t)
        lbs.append(lb), lcs.append(lc), ts.append(t)
    whole.add(np.concatenate(lbs), np.concatenate(lcs), np.concatenate(ts))
    ma, mw = a.result(), whole.result()
    assert ma.n_samples == 2 and mw.n_samples == 1
    for f in ("ppl_baseline", "ppl_candidate", "kl_mean", "kl_median", "kl_p99", "top1_agreement"):
        assert getattr(ma, f) == pytest.approx(getattr(mw, f))


def test_identical_inputs_give_exact_zero_kl():
    logits = np.random.default_rng(1).normal(scale=5, size=(9, 50)).astype(np.float32)
    lb = renormalize(storage_log_probs(logits))
    acc = MetricsAccumulator()
    acc.add(lb, lb.copy(), lb.argmax(axis=-1))
    m = acc.result()
    assert (m.kl_mean, m.kl_max, m.top1_agreement, m.ppl_ratio, m.accuracy_drop) == (0.0, 0.0, 1.0, 1.0, 0.0)


def test_empty_and_roundtrip():
    m = MetricsAccumulator().result()
    assert m.n_tokens == 0 and math.isnan(m.ppl_baseline) and m.accuracy_drop is None
    d = m.to_dict()
    assert d["ppl_baseline"] is None
    back = Metrics.from_dict(d)
    assert math.isnan(back.kl_mean) and back.accuracy_drop is None


@settings(max_examples=40, deadline=None)
@given(arrays(np.float64, (4, 16), elements=st.floats(-20, 20)), arrays(np.float64, (4, 16), elements=st.floats(-20, 20)))
def test_kl_nonnegative_and_zero_on_self(a, b):
    la, lb = log_softmax(a), log_softmax(b)
    assert (kl_per_token(la, lb) >= -1e-9).all()
    assert np.all(kl_per_token(la, la) == 0.0)
    assert np.allclose(np.exp(renormalize(storage_log_probs(a))).sum(axis=-1), 1.0)


def test_standard_errors_follow_llama_perplexity():
    """± as llama-perplexity prints them: SE of the mean with n-1, PPL's propagated from the mean NLL, top-1
    binomial, and kl_mean_upper95 = kl_mean + 1.96 * SE."""
    rng = np.random.default_rng(3)
    lb, lc = log_softmax(rng.normal(size=(40, 9))), log_softmax(rng.normal(size=(40, 9)))
    t = rng.integers(0, 9, 40)
    acc = MetricsAccumulator()
    acc.add(lb[:15], lc[:15], t[:15])
    acc.add(lb[15:], lc[15:], t[15:])
    m = acc.result()
    rows = np.arange(40)
    nll_b, nll_c = -lb[rows, t], -lc[rows, t]
    kl = kl_per_token(lb, lc)
    n = 40
    assert m.kl_mean_se == pytest.approx(np.std(kl) / math.sqrt(n - 1), rel=1e-9)
    assert m.kl_mean_upper95 == pytest.approx(m.kl_mean + 1.96 * m.kl_mean_se, rel=1e-12)
    assert m.ppl_baseline_se == pytest.approx(m.ppl_baseline * np.std(nll_b) / math.sqrt(n - 1), rel=1e-9)
    assert m.ppl_candidate_se == pytest.approx(m.ppl_candidate * np.std(nll_c) / math.sqrt(n - 1), rel=1e-9)
    assert m.ln_ppl_ratio_se == pytest.approx(np.std(nll_c - nll_b) / math.sqrt(n - 1), rel=1e-9)
    assert m.ppl_ratio_se == pytest.approx(m.ppl_ratio * m.ln_ppl_ratio_se, rel=1e-12)
    p = m.top1_agreement
    assert 0 < p < 1 and m.top1_agreement_se == pytest.approx(math.sqrt(p * (1 - p) / (n - 1)), rel=1e-12)


def test_standard_errors_round_trip_and_old_records():
    acc = MetricsAccumulator()
    acc.add(log_softmax(np.array([[0.0, 1.0]])), log_softmax(np.array([[1.0, 0.0]])), np.array([1]))
    m = acc.result()
    assert m.n_tokens == 1 and math.isnan(m.kl_mean_se) and math.isnan(m.kl_mean_upper95)   # n - 1 = 0
    d = m.to_dict()
    assert d["kl_mean_se"] is None and Metrics.from_dict(d).to_dict() == d
    old = {k: v for k, v in d.items() if not k.endswith(("_se", "_upper95"))}   # a record from before the SEs
    assert math.isnan(Metrics.from_dict(old).kl_mean_upper95)
