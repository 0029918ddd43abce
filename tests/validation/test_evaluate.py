"""evaluate(): identical models, Q8_0 vs Q2_K ordering, baseline cache hit/miss, report round trip, CLI --json."""
from __future__ import annotations

import json

import pytest

from tests.validation._tiny import tiny_ggufs, tiny_model, write_samples  # noqa: F401  (fixtures)
from validation.eval_report import EvalReport
from validation.evaluate import evaluate


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_samples(tmp_path_factory.mktemp("ds") / "eval.jsonl")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def q8_report(tiny_model, tiny_ggufs, dataset, cache):  # noqa: F811
    calls = []
    rep = evaluate(tiny_model, tiny_ggufs["Q8_0"], dataset, max_tokens=48, batch_size=4, cache_dir=cache,
                   progress=lambda d, n, what: calls.append((d, n, what)))
    return rep, calls


def test_identical_candidate(tiny_model, tiny_ggufs, dataset, cache):  # noqa: F811
    rep = evaluate(tiny_model, tiny_ggufs["F16"], dataset, max_tokens=48, cache_dir=cache)
    m = rep.overall
    assert (m.kl_mean, m.kl_max, m.top1_agreement, m.ppl_ratio) == (0.0, 0.0, 1.0, 1.0)
    assert m.ppl_baseline == m.ppl_candidate and m.acc_baseline == m.acc_candidate
    assert all(e.mse == 0.0 for e in rep.per_tensor)


def test_q8_small_q2_larger(q8_report, tiny_model, tiny_ggufs, dataset, cache):  # noqa: F811
    q8, calls = q8_report
    q2 = evaluate(tiny_model, tiny_ggufs["Q2_K"], dataset, max_tokens=48, cache_dir=cache)
    assert [(d, n) for d, n, what in calls if what == "evaluate"] == [(4, 6), (6, 6)]
    assert 0 < q8.overall.kl_mean < 0.05 and q8.overall.top1_agreement > 0.8
    assert q2.overall.kl_mean > 10 * q8.overall.kl_mean
    assert q2.overall.kl_p99 > q8.overall.kl_p99 and q2.overall.top1_agreement < q8.overall.top1_agreement
    assert abs(q2.overall.ln_ppl_ratio) > abs(q8.overall.ln_ppl_ratio)
    assert set(q8.per_category) == {"chat", "code", "math"}
    assert sum(m.n_tokens for m in q8.per_category.values()) == q8.n_tokens == q8.overall.n_tokens
    assert q8.n_samples == 6 and all(m.n_samples == 2 for m in q8.per_category.values())
    assert q8.n_tokens == 6 * 47  # every sample fills max_tokens (BOS + 47 scored tokens)


def test_cache_hit_then_miss_on_new_dataset(q8_report, tiny_model, tiny_ggufs, dataset, cache, tmp_path):  # noqa: F811
    first, _ = q8_report
    again = evaluate(tiny_model, tiny_ggufs["Q8_0"], dataset, max_tokens=48, batch_size=2, cache_dir=cache)
    assert again.timings.baseline_cache_hit and again.timings.baseline_tokens_per_s is None
    assert again.overall == first.overall   # deterministic, and independent of batch_size
    other = write_samples(tmp_path / "other.jsonl", seed=7)
    changed = evaluate(tiny_model, tiny_ggufs["Q8_0"], other, max_tokens=48, cache_dir=cache)
    assert not changed.timings.baseline_cache_hit and changed.dataset_sha256 != first.dataset_sha256
    shorter = evaluate(tiny_model, tiny_ggufs["Q8_0"], dataset, max_tokens=32, cache_dir=cache)
    assert not shorter.timings.baseline_cache_hit


def test_report_round_trip(q8_report):
    rep, _ = q8_report
    d = json.loads(rep.to_json())
    assert d["schema_version"] == 1 and len(d["baseline"]["sha256"]) == 64 and len(d["candidate"]["sha256"]) == 64
    assert EvalReport.from_dict(d).to_dict() == d
    assert d["timings"]["candidate_tokens_per_s"] > 0


def test_rejects_quantized_baseline(tiny_ggufs, dataset, cache):  # noqa: F811
    from core.errors import QuantGateError

    with pytest.raises(QuantGateError, match="F32/F16/BF16"):
        evaluate(tiny_ggufs["Q8_0"], tiny_ggufs["Q2_K"], dataset, cache_dir=cache)


def test_cli_json(tiny_model, tiny_ggufs, dataset, cache, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(cache))
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["evaluate", "--baseline", str(tiny_model), "--candidate", str(tiny_ggufs["Q8_0"]),
                                   "--dataset", str(dataset), "--max-tokens", "48", "--json", str(out)])
    assert res.exit_code == 0, res.output
    assert "quality vs baseline" in res.output and "overall" in res.output
    d = json.loads(out.read_text())
    assert d["n_samples"] == 6 and d["overall"]["kl_mean"] > 0 and d["backend"] == "torch"
    bad = CliRunner().invoke(app, ["evaluate", "--baseline", str(tiny_model), "--candidate", str(tmp_path / "no.gguf"),
                                   "--dataset", str(dataset)])
    assert bad.exit_code == 2 and "no such file" in bad.output
