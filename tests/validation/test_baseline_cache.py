"""The streaming evaluation: compact uint16 baseline records (format, error bound on the reference model), one
model in memory at a time, cache invalidation, and gating on kl_mean_upper95 (docs/EVALUATION.md)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

import validation.evaluate as ev
from tests.validation._tiny import (  # noqa: F401  (fixtures)
    make_tiny_model,
    quantize_to,
    tiny_ggufs,
    tiny_model,
    write_samples,
)
from validation.logits_cache import (
    KLD_REL_ERROR_BOUND,
    CacheKey,
    LogitsCache,
    compress,
    decode,
    record_dtype,
    score_against,
)
from validation.metrics import kl_per_token, log_softmax
from validation.thresholds import evaluate_gates, gates_from_config, load_gates

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "reference"
EVAL = Path(__file__).resolve().parents[2] / "data" / "eval.jsonl"


def test_record_layout_and_small_error():
    rng = np.random.default_rng(0)
    lb = log_softmax(rng.normal(scale=3, size=(20, 50)))
    lc = log_softmax(lb + rng.normal(scale=0.3, size=(20, 50)))
    t = rng.integers(0, 50, 20)
    assert record_dtype(50).itemsize == 2 * 50 + 16
    rec = compress(lb, t)
    assert np.array_equal(rec["top1"], lb.argmax(axis=-1))
    assert np.allclose(rec["lp_target"], lb[np.arange(20), t], atol=1e-6)
    assert np.all(rec["q"].max(axis=-1) == 65535)                    # the max sits on the top of the grid
    above = lb > rec["min_lp"][:, None] + 1e-3                           # entries not clamped
    assert np.abs(decode(rec) - lb)[above].max() < 16 / 65535          # half a step, plus the renormalization
    lt_b, lt_c, top_b, top_c, kl = score_against(rec, lc, t)
    exact = kl_per_token(lb, lc)
    assert np.abs(kl - exact).max() < 1e-3 * exact.max() and abs(kl.mean() / exact.mean() - 1) < 1e-3
    assert np.array_equal(top_b, lb.argmax(axis=-1)) and np.array_equal(top_c, lc.argmax(axis=-1))
    assert np.allclose(lt_c, lc[np.arange(20), t], atol=1e-6)
    same = score_against(rec, lb, t)
    assert np.all(same[4] == 0.0) and np.array_equal(same[0], same[1])


def test_clamp_follows_llama_perplexity():
    lp = log_softmax(np.array([[0.0, -1.0, -30.0, -40.0]]))     # two entries more than 16 nats below the max
    rec = compress(lp, np.array([0]))
    assert rec["min_lp"][0] == pytest.approx(lp[0, 0] - 16, abs=1e-5) and list(rec["q"][0, 2:]) == [0, 0]


def test_disk_round_trip_keeps_every_byte(tmp_path):
    rng = np.random.default_rng(1)
    key = CacheKey("a" * 64, "b" * 64, 32, "0.1.0", "c" * 64, "torch")
    recs = [compress(log_softmax(rng.normal(size=(n, 30))), rng.integers(0, 30, n)) for n in (5, 0, 3)]
    cache = LogitsCache(tmp_path)
    with cache.writer(key, 30) as w:
        for r in recs:
            w.append(r)
    data, meta = cache.paths(key)
    assert data.stat().st_size == 8 * record_dtype(30).itemsize
    assert json.loads(meta.read_text())["offsets"] == [0, 5, 5, 8]
    hit = cache.lookup(key)
    assert hit is not None and hit.n_vocab == 30
    for i, r in enumerate(recs):
        assert hit.sample(i).tobytes() == r.tobytes()
    assert cache.lookup(dataclasses.replace(key, backend="llama.cpp")) is None


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Exact (both models, float64 full log-probs) and cached (top-k records) evaluation of the reference model's
    Q2_K on the first 16 samples of data/eval.jsonl, 64 tokens each."""
    tmp = tmp_path_factory.mktemp("ref")
    subset = tmp / "eval16.jsonl"
    subset.write_text("".join(EVAL.read_text(encoding="utf-8").splitlines(keepends=True)[:16]), encoding="utf-8")
    q2 = quantize_to(REFERENCE, tmp / "ref-q2_k.gguf", "Q2_K")
    exact = ev.evaluate(REFERENCE, q2, subset, max_tokens=64, exact=True)
    cached = ev.evaluate(REFERENCE, q2, subset, max_tokens=64, cache_dir=tmp / "cache")
    return exact, cached


def test_cached_scoring_matches_exact_within_the_documented_bound(reference_runs):
    exact, cached = reference_runs
    e, c = exact.overall, cached.overall
    assert e.n_tokens == c.n_tokens > 500 and not exact.cache_key and cached.cache_key
    rel = (e.kl_mean - c.kl_mean) / e.kl_mean
    print(f"reference Q2_K: exact kl_mean {e.kl_mean:.6g} ± {e.kl_mean_se:.3g}, cached {c.kl_mean:.6g}, rel {rel:.3g}")
    assert abs(rel) <= KLD_REL_ERROR_BOUND, rel
    assert abs(e.kl_mean - c.kl_mean) <= 0.01 * e.kl_mean_se   # far inside the statistical uncertainty
    assert c.top1_agreement == e.top1_agreement and c.acc_baseline == e.acc_baseline
    assert c.acc_candidate == e.acc_candidate
    assert c.ppl_ratio == pytest.approx(e.ppl_ratio, rel=1e-5)
    assert c.ppl_baseline == pytest.approx(e.ppl_baseline, rel=1e-5)
    assert c.kl_mean_se == pytest.approx(e.kl_mean_se, rel=5 * KLD_REL_ERROR_BOUND)
    assert set(exact.per_category) == set(cached.per_category) == {"code"}   # the first 16 samples are code
    for cat in exact.per_category:
        ec, cc = exact.per_category[cat], cached.per_category[cat]
        assert abs(ec.kl_mean - cc.kl_mean) / ec.kl_mean <= KLD_REL_ERROR_BOUND


def test_gate_on_kl_mean_upper95(reference_runs, tmp_path):
    _exact, rep = reference_runs
    m = rep.overall
    assert m.kl_mean_se > 0 and m.kl_mean_upper95 == pytest.approx(m.kl_mean + 1.96 * m.kl_mean_se)
    between = (m.kl_mean + m.kl_mean_upper95) / 2        # the point estimate passes, the 95% bound does not
    gates = gates_from_config({"gates": [f"kl_mean <= {between}", f"kl_mean_upper95 <= {between}",
                                         f"kl_mean_upper95 <= {m.kl_mean_upper95 * 1.01}"]})
    assert [g.passed for g in evaluate_gates(gates, rep)] == [True, False, True]
    f = tmp_path / "gates.yaml"
    f.write_text("gates:\n  - kl_mean_upper95 <= 0.01\n", encoding="utf-8")
    res = evaluate_gates(load_gates(f), rep)
    assert res[0].metric == "kl_mean_upper95" and res[0].passed is (m.kl_mean_upper95 <= 0.01)


@pytest.fixture
def dataset(tmp_path):
    return write_samples(tmp_path / "eval.jsonl")


def test_one_model_in_memory_at_a_time(tiny_model, tiny_ggufs, dataset, tmp_path, monkeypatch):  # noqa: F811
    live: list[str] = []
    peak = [0]
    real_open = ev.open_backend

    def counting_open(kind, model, *, n_ctx):
        b = real_open(kind, model, n_ctx=n_ctx)
        live.append(str(model))
        peak[0] = max(peak[0], len(live))
        real_close = b.close

        def close():
            live.remove(str(model))
            real_close()
        b.close = close
        return b

    real_stream = ev.stream_logits

    def counting_stream(model, *a, **kw):  # the layer-streamed torch passes hold one model too
        live.append(str(model))
        peak[0] = max(peak[0], len(live))
        try:
            return real_stream(model, *a, **kw)
        finally:
            live.remove(str(model))

    monkeypatch.setattr(ev, "open_backend", counting_open)
    monkeypatch.setattr(ev, "stream_logits", counting_stream)
    rep = ev.evaluate(tiny_model, tiny_ggufs["Q8_0"], dataset, max_tokens=32, cache_dir=tmp_path / "c")
    assert not rep.timings.baseline_cache_hit and peak[0] == 1 and live == []
    ev.evaluate(tiny_model, tiny_ggufs["Q8_0"], dataset, max_tokens=32, exact=True)
    assert peak[0] == 2                                  # the exact path really holds both: the counter can fail


def test_cache_invalidation(tiny_model, tiny_ggufs, dataset, tmp_path, monkeypatch):  # noqa: F811
    cache = tmp_path / "cache"
    key, hit = ev.cache_baseline(tiny_model, dataset, max_tokens=32, cache_dir=cache)
    assert not hit and key.backend == "torch"
    assert ev.cache_baseline(tiny_model, dataset, max_tokens=32, batch_size=1, cache_dir=cache) == (key, True)
    rep = ev.evaluate(tiny_model, tiny_ggufs["Q8_0"], dataset, max_tokens=32, cache_dir=cache)
    assert rep.timings.baseline_cache_hit and rep.cache_key == key.digest()
    changed = [
        ev.cache_baseline(tiny_model, write_samples(tmp_path / "other.jsonl", seed=9), max_tokens=32, cache_dir=cache),
        ev.cache_baseline(tiny_model, dataset, max_tokens=24, cache_dir=cache),
    ]
    other_model = make_tiny_model(tmp_path / "other-model", seed=5)
    changed.append(ev.cache_baseline(other_model, dataset, max_tokens=32, cache_dir=cache))
    monkeypatch.setattr(ev, "__version__", "0.0.0-other")
    changed.append(ev.cache_baseline(tiny_model, dataset, max_tokens=32, cache_dir=cache))
    assert [hit for _k, hit in changed] == [False] * 4
    assert len({key.digest()} | {k.digest() for k, _ in changed}) == 5
