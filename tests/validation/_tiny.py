"""Tiny, deterministic fixtures shared by the evaluation tests: a ~0.5M-parameter Llama (F16 safetensors) with a
SentencePiece byte-fallback tokenizer, a few JSONL samples, and quantized GGUFs of the model."""
from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pytest

_WORDS = ("def return import class print value sum of and is to in for while if else the a "
          "User: Assistant: 0 1 2 3 4 5 6 7 8 9 + - * / = ( ) : x y total price").split()


def _lines(seed: int, n: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(14)) for _ in range(n)]


def make_tiny_model(out: Path, *, seed: int = 0) -> Path:
    """Write an HF Llama folder (F16 weights, GQA 4/2 heads, n_embd 256 so k-quants apply) with a tokenizer."""
    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_lines(seed, 300)), model_writer=buf, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    LlamaTokenizer.from_pretrained(str(out)).save_pretrained(str(out))
    cfg = LlamaConfig(vocab_size=320, hidden_size=256, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      rms_norm_eps=1e-5, rope_theta=10000.0, initializer_range=0.15, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float16)
    model.save_pretrained(str(out))
    return out


def write_samples(path: Path, *, seed: int = 1, n: int = 6) -> Path:
    """A tiny eval JSONL in data/eval.jsonl's format, two samples per category."""
    cats = ("code", "chat", "math")
    rows = [{"id": f"t-{i:03d}", "category": cats[i % 3], "text": " ".join(_lines(seed + i, 3)),
             "source": "tests"} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def quantize_to(src: Path, out: Path, precision: str) -> Path:
    """Quantize `src` with the pipeline (the same path `quantgate quantize` takes)."""
    from core.records import QuantizeRequest
    from quantgate.pipeline import quantize_model

    quantize_model(QuantizeRequest(source=src, out=out, precision=precision))
    return out


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("ggufs")
    return {p: quantize_to(tiny_model, d / f"tiny-{p}.gguf", p) for p in ("F16", "Q8_0", "Q2_K")}


@pytest.fixture
def eval_jsonl(tmp_path) -> Path:
    return write_samples(tmp_path / "eval.jsonl")
