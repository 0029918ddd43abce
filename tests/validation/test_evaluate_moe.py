"""evaluate / validate on MoE models (Mixtral-style and Qwen2-MoE with its shared expert): an HF folder and its F16
GGUF are both usable baselines and score a quantized MoE GGUF alike; the gate passes and fails on it."""
from __future__ import annotations

import pytest
from typer.testing import CliRunner

from quantgate.cli import app
from tests.validation._tiny import write_samples
from validation.evaluate import evaluate

MAX_TOKENS = 48


@pytest.fixture(scope="module", params=("mixtral", "qwen2moe"))
def moe(request, tmp_path_factory):
    """(HF folder, its F16 GGUF, a Q4_K_M GGUF of it, eval JSONL, cache dir)."""
    from quantgate.convert import convert_model
    from tests.quantgate.tiny_hf import make_tiny_model

    d = tmp_path_factory.mktemp(request.param)
    hf = make_tiny_model(d / "hf", request.param, seed=4)
    convert_model(hf, d / "f16.gguf", "f16")
    r = CliRunner().invoke(app, ["quantize", "--model", str(hf), "--precision", "Q4_K_M", "--out",
                                 str(d / "q4.gguf"), "-q"])
    assert r.exit_code == 0, r.output
    return hf, d / "f16.gguf", d / "q4.gguf", write_samples(d / "eval.jsonl", n=8), d / "cache"


def test_hf_and_gguf_baselines_score_a_moe_candidate_alike(moe):
    hf, f16, q4, ds, cache = moe
    a = evaluate(hf, q4, ds, max_tokens=MAX_TOKENS, batch_size=4, cache_dir=cache)
    b = evaluate(f16, q4, ds, max_tokens=MAX_TOKENS, batch_size=4, cache_dir=cache)
    same = evaluate(hf, f16, ds, max_tokens=MAX_TOKENS, batch_size=4, cache_dir=cache)
    assert a.overall.n_tokens == b.overall.n_tokens > 0
    # each baseline tokenizes with its own tokenizer: SentencePiece (Mixtral) gives the same ids from both, the tiny
    # byte-level BPE (Qwen) a few different ids (transformers vs llama.cpp, docs/ANALYZER.md): same scores vs close
    rel = 1e-4 if (hf / "tokenizer.model").is_file() else 0.1
    assert 0 < a.overall.kl_mean == pytest.approx(b.overall.kl_mean, rel=rel)
    assert a.overall.ppl_baseline == pytest.approx(b.overall.ppl_baseline, rel=rel)
    assert same.overall.kl_mean < 1e-5 < a.overall.kl_mean   # the F16 GGUF runs as the HF model, experts included
    per = {t.name: t for t in a.per_tensor}
    assert per["blk.1.ffn_down_exps.weight"].shape[0] in (4, 8) and per["blk.1.ffn_down_exps.weight"].mse > 0
    assert per["blk.0.ffn_gate_inp.weight"].qtype == "F32" and per["blk.0.ffn_gate_inp.weight"].mse == 0


def test_validate_gates_a_moe_candidate_against_either_baseline(moe, tmp_path, monkeypatch):
    hf, f16, q4, ds, cache = moe
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(cache))
    for base in (hf, f16):
        args = ["validate", "--baseline", str(base), "--quantized", str(q4), "--dataset", str(ds),
                "--max-tokens", str(MAX_TOKENS), "--report-dir", str(tmp_path / "r"), "--no-expectations",
                "--metric", "kl_mean"]
        ok = CliRunner().invoke(app, args + ["--threshold", "10"])
        assert ok.exit_code == 0, ok.output
        assert ok.output.strip().splitlines()[-1].startswith("PASSED: ")
        bad = CliRunner().invoke(app, args + ["--threshold", "1e-9"])
        assert bad.exit_code == 1, bad.output
        assert bad.output.strip().splitlines()[-1].startswith("FAILED: ")


@pytest.mark.oracle
def test_llama_cpp_backend_scores_a_moe_candidate(require_oracle, moe):
    hf, f16, q4, ds, cache = moe
    t = evaluate(hf, q4, ds, max_tokens=MAX_TOKENS, batch_size=4, cache_dir=cache)
    c = evaluate(hf, q4, ds, backend="llama.cpp", max_tokens=MAX_TOKENS, batch_size=4, cache_dir=cache)
    assert c.overall.n_tokens == t.overall.n_tokens
    assert c.overall.kl_mean == pytest.approx(t.overall.kl_mean, rel=0.2, abs=2e-3)
