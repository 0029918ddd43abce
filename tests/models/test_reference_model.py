"""The bundled reference model (models/reference): loads, is shaped and stored as documented, and is really trained."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

REF = Path(__file__).resolve().parents[2] / "models" / "reference"
EVAL = REF.parents[1] / "data" / "eval.jsonl"
SHAPE = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4,
         "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 512}


@pytest.fixture(scope="module")
def log() -> dict:
    return json.loads((REF / "train_log.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def model():
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(REF), dtype=torch.float32)
    m.eval()
    return m


@pytest.fixture(scope="module")
def sp():
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(REF / "tokenizer.model"))


def expected_params(c: dict) -> int:
    h, i, v, layers = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return 2 * v * h + layers * per_layer + h


def test_files_and_size():
    names = {p.name for p in REF.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json", "README.md", "loss_curve.png", "train_log.json", "train_manifest.json"} <= names
    assert sum(p.stat().st_size for p in REF.iterdir() if p.is_file()) <= 25 * 1024 * 1024


def test_config_and_parameter_count(model, log):
    cfg = json.loads((REF / "config.json").read_text())
    assert {k: cfg[k] for k in SHAPE} == SHAPE
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["torch_dtype"] == "float16" == cfg["dtype"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["tie_word_embeddings"]) == (1, 2, False)
    n = sum(p.numel() for p in model.parameters())
    assert n == expected_params(cfg) == log["parameters"]
    assert f"{n:,}" in (REF / "README.md").read_text(encoding="utf-8")


def test_safetensors_all_f16_and_rows_fit_k_quants():
    from safetensors import safe_open

    with safe_open(str(REF / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        assert len(keys) == 2 + 9 * SHAPE["num_hidden_layers"] + 1
        for k in keys:
            sl = f.get_slice(k)
            assert sl.get_dtype() == "F16", k
            shape = sl.get_shape()
            assert shape[-1] % 256 == 0, (k, shape)
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [64, 256]
        assert f.get_slice("model.layers.0.mlp.down_proj.weight").get_shape() == [256, 768]


def test_sentencepiece_model_is_llama_style(sp):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString((REF / "tokenizer.model").read_bytes())
    assert proto.trainer_spec.byte_fallback and proto.trainer_spec.model_type == pb.TrainerSpec.BPE
    assert proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces
    assert sp.get_piece_size() == 4096
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id()) == (0, 1, 2, -1)
    text = "def f(x):\n    return x * 2  # ok\n\nUser: déjà vu 你好"
    assert sp.decode(sp.encode(text)) == text  # byte fallback: nothing is lost


def test_transformers_tokenizer_matches_sentencepiece(sp):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(REF))
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    texts = [json.loads(line)["text"] for line in EVAL.read_text(encoding="utf-8").splitlines()]
    texts = [t for t in texts if not t[0].isspace()][:20]  # leading whitespace: see README (dummy prefix)
    assert len(texts) == 20
    for t in texts:
        assert tok(t)["input_ids"] == [1] + sp.encode(t)


def test_held_out_perplexity_far_below_vocab(model, sp, log):
    import torch

    rows = [json.loads(line) for line in EVAL.read_text(encoding="utf-8").splitlines()]
    picked = [next(r for r in rows if r["category"] == c) for c in ("code", "chat", "math")]
    nll, count = 0.0, 0
    with torch.no_grad():
        for r in picked:
            ids = torch.tensor(([1] + sp.encode(r["text"]))[:512]).unsqueeze(0)
            logits = model(ids).logits[0, :-1]
            nll += torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
            count += ids.shape[1] - 1
    ppl = math.exp(nll / count)
    assert ppl < 60, ppl  # an untrained model scores ~4096 (uniform over the vocabulary)
    overall = log["eval_ppl_f16_roundtrip"]["overall"]["ppl"]
    assert overall < 50 and abs(log["eval_ppl_float32"]["overall"]["ppl"] - overall) / overall < 0.02


def test_training_log_shows_learning(log):
    losses = [r["loss"] for r in log["log"]]
    assert losses[0] > 7.5 and losses[-1] < 0.5 * losses[0]
    assert 0 <= log["steps"] - log["log"][-1]["step"] < log["args"]["log_every"]
    assert log["tokens_seen"] == log["steps"] * log["args"]["batch"] * log["args"]["seq_len"] > 500_000
