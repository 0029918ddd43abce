"""Runtime proof with the real llama.cpp (llama-cpp-python): a GGUF that `quantgate convert` makes from an HF
folder tokenizes like the HF tokenizer and gives transformers' float32 logits; Q8_0 / Q4_K_M files that
`quantgate quantize` makes from the HF folder load and generate. Tiny random Llama / Mistral / Qwen2 models, and
the bundled reference model (models/reference/) when it exists.

Each logits comparison prints one JSON line (run with -s to see it): max |logit diff|, top-1 agreement."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from core.records import QuantizeRequest
from quantgate.convert import convert_model
from quantgate.pipeline import quantize_model
from tests.quantgate.test_convert import _gguf
from tests.quantgate.test_pipeline_llamacpp import MIXES, _llama_quantize
from tests.quantgate.tiny_hf import EVAL_TEXTS, make_tiny_model

pytestmark = pytest.mark.oracle
REFERENCE = Path(__file__).resolve().parents[2] / "models" / "reference"
N_CTX = 256


def _llama(path: Path):
    import llama_cpp

    return llama_cpp.Llama(str(path), logits_all=True, n_ctx=N_CTX, n_threads=2, seed=0, verbose=False)


def _hf_ids(model_dir: Path, text: str) -> list[int]:
    """What the checkpoint's own tokenizer gives (SentencePiece + BOS for Llama-style folders, HF otherwise)."""
    if (model_dir / "tokenizer.model").is_file():
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
        return [sp.bos_id()] + sp.encode(text)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).encode(text)


def _compare_logits(model_dir: Path, gguf_path: Path, texts=EVAL_TEXTS, label: str = "") -> dict:
    """Feed each text's token ids to llama.cpp and to transformers (float32); returns the figures."""
    import torch
    import transformers as tf

    hf = tf.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    llm = _llama(gguf_path)
    max_diff, agree, total, tok_mismatch = 0.0, 0, 0, []
    for text in texts:
        ids = llm.tokenize(text.encode(), add_bos=True, special=False)[:N_CTX]
        if ids != _hf_ids(model_dir, text)[:N_CTX]:
            tok_mismatch.append(text)
        llm.reset()
        llm.eval(ids)
        ours = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        max_diff = max(max_diff, float(np.abs(ours - ref).max()))
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        total += len(ids)
    llm.close()
    res = {"model": label or model_dir.name, "gguf": gguf_path.name, "positions": total,
           "top1_agreement": agree / total, "max_abs_logit_diff": max_diff, "tokenization_mismatches": tok_mismatch}
    print(json.dumps(res))
    return res


def _greedy(path: Path, prompt: str, n: int = 12) -> list[int]:
    llm = _llama(path)
    runs = []
    for _ in range(2):
        llm.reset()
        out = []
        for t in llm.generate(llm.tokenize(prompt.encode(), add_bos=True), top_k=1, temp=0.0, reset=True):
            out.append(t)
            if len(out) == n:
                break
        runs.append(out)
    text = llm.detokenize(runs[0])
    llm.close()
    assert runs[0] == runs[1], "greedy generation is not deterministic"
    assert text.strip(), f"empty generation: {runs[0]}"
    return runs[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    d = tmp_path_factory.mktemp("runtime")
    out = {}
    for i, arch in enumerate(("llama", "mistral", "qwen2")):
        hf = make_tiny_model(d / arch, arch, seed=10 + i)
        f16 = d / f"{arch}-F16.gguf"
        convert_model(hf, f16, "f16")
        out[arch] = (hf, f16)
    return out


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
def test_converted_f16_matches_transformers(require_oracle, tiny, arch):
    hf, f16 = tiny[arch]
    res = _compare_logits(hf, f16, label=f"tiny-{arch}")
    assert res["tokenization_mismatches"] == []
    assert res["top1_agreement"] >= 0.99, res
    assert res["max_abs_logit_diff"] < 0.05, res


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_quantized_from_hf_folder_generates(require_oracle, tiny, tmp_path, arch, mix):
    hf, f16 = tiny[arch]
    q = tmp_path / f"{arch}-{mix}.gguf"
    quantize_model(QuantizeRequest(source=hf, out=q, precision=mix))
    # The whole file but quantgate.*: every KV (tokenizer included, same order) and tensor as llama.cpp's
    # llama_model_quantize makes them from our converted F16 GGUF.
    lq = tmp_path / "llama-quantize.gguf"
    _llama_quantize(f16, lq, MIXES[mix])
    assert _gguf(q) == _gguf(lq)
    toks = _greedy(q, "The model runs")
    assert len(toks) == 12
    if mix == "Q8_0":
        res = _compare_logits(hf, q, texts=EVAL_TEXTS[:2], label=f"tiny-{arch}")
        assert res["top1_agreement"] >= 0.8 and res["max_abs_logit_diff"] < 0.5, res


# --- the bundled reference model (trained by scripts/train_reference_model.py) ---------------------------------

def _reference() -> Path:
    if not ((REFERENCE / "model.safetensors").is_file() and (REFERENCE / "tokenizer.model").is_file()):
        pytest.skip("models/reference/ not built yet (scripts/train_reference_model.py)")
    return REFERENCE


@pytest.fixture(scope="module")
def reference_f16(tmp_path_factory) -> tuple[Path, Path]:
    ref = _reference()
    f16 = tmp_path_factory.mktemp("reference") / "reference-F16.gguf"
    convert_model(ref, f16, "f16")
    return ref, f16


REFERENCE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It was a bright cold day in April.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))\n",
    "Question: what is 12 plus 30? Answer: 42.",
)


@pytest.mark.slow
def test_reference_f16_matches_transformers(require_oracle, reference_f16):
    ref, f16 = reference_f16
    res = _compare_logits(ref, f16, texts=REFERENCE_TEXTS + EVAL_TEXTS, label="reference")
    assert res["tokenization_mismatches"] == []
    assert res["top1_agreement"] >= 0.99, res


@pytest.mark.slow
@pytest.mark.parametrize("mix", ["Q8_0", "Q4_K_M"])
def test_reference_quantized_generates(require_oracle, reference_f16, tmp_path, mix):
    ref, f16 = reference_f16
    q = tmp_path / f"reference-{mix}.gguf"
    quantize_model(QuantizeRequest(source=ref, out=q, precision=mix))
    toks = _greedy(q, "The quick brown fox", n=16)
    assert len(toks) == 16
    res = _compare_logits(ref, q, texts=REFERENCE_TEXTS + EVAL_TEXTS, label=f"reference-{mix}")
    assert res["top1_agreement"] >= {"Q8_0": 0.97, "Q4_K_M": 0.85}[mix], res
    if mix == "Q4_K_M":  # every tensor as llama.cpp's own llama_model_quantize makes it from our F16 GGUF
        lq = tmp_path / "llama-quantize-Q4_K_M.gguf"
        _llama_quantize(f16, lq, MIXES["Q4_K_M"])
        assert _gguf(q) == _gguf(lq)  # every KV but quantgate.* and every tensor
