"""Backends: tokenization rule, torch from GGUF == torch from the HF folder, llama.cpp agrees with torch."""
from __future__ import annotations

import numpy as np
import pytest

from runtime.backends import open_backend
from runtime.tokenize import tokenize_samples
from tests.validation._tiny import eval_jsonl, tiny_ggufs, tiny_model  # noqa: F401  (fixtures)


def test_tokenize_bos_and_truncation(tiny_model):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    text = "def total ( x ) : return x + 1 " * 10
    ids = tokenize_samples(tiny_model, [text, "x"], 16)
    assert ids[0][0] == tok.bos_token_id == 1
    assert len(ids[0]) == 16 and ids[0][1:] == tok(text, add_special_tokens=False)["input_ids"][:15]
    assert ids[1] == [1] + tok("x", add_special_tokens=False)["input_ids"]
    with pytest.raises(Exception):
        tokenize_samples(tiny_model, ["x"], 1)


def test_torch_gguf_f16_equals_hf_folder(tiny_model, tiny_ggufs):  # noqa: F811
    batch = [[1, 5, 9, 200, 7], [1, 44, 3]]
    a = open_backend("torch", tiny_model, n_ctx=16).logits(batch)
    b = open_backend("torch", tiny_ggufs["F16"], n_ctx=16).logits(batch)
    assert [x.shape for x in a] == [(5, 320), (3, 320)]
    for x, y in zip(a, b):
        assert np.array_equal(x, y)


def test_logits_do_not_depend_on_batch_company(tiny_model):  # noqa: F811
    be = open_backend("torch", tiny_model, n_ctx=16)
    alone = be.logits([[1, 44, 3]])[0]
    together = be.logits([[1, 5, 9, 200, 7, 8, 9], [1, 44, 3]])[1]
    assert np.array_equal(alone, together)  # bit-identical: cached baselines stay valid for any batch size


@pytest.mark.oracle
def test_llamacpp_and_torch_perplexity_agree(require_oracle, tiny_model, tiny_ggufs, eval_jsonl, tmp_path):  # noqa: F811
    """The same candidate scored by both backends: perplexities within 1% of each other."""
    from validation.evaluate import evaluate

    kw = dict(max_tokens=64, cache_dir=tmp_path)
    t = evaluate(tiny_model, tiny_ggufs["Q8_0"], eval_jsonl, backend="torch", **kw)
    c = evaluate(tiny_model, tiny_ggufs["Q8_0"], eval_jsonl, backend="llama.cpp", **kw)
    assert c.timings.baseline_cache_hit and c.n_tokens == t.n_tokens > 100
    assert c.overall.ppl_candidate == pytest.approx(t.overall.ppl_candidate, rel=0.01)
    assert c.overall.kl_mean < 0.05 and c.overall.top1_agreement > 0.8
