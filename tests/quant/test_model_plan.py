"""quant.model_plan: HF llama folders -> GGUF names, Q/K permutation, KVs; GGUF pass-through; --generic."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from core.errors import CheckpointError
from quant.gguf_kv import KV
from quant.loaders.base import Checkpoint, SourceTensor
from quant.loaders.safetensors_src import open_safetensors_checkpoint
from quant.model_plan import GENERIC_ARCH, permute_qk, plan_model

CFG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 16, "intermediate_size": 32,
       "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 24,
       "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "tie_word_embeddings": False}


def _hf_folder(tmp_path: Path, cfg: dict = CFG) -> tuple[Path, dict[str, np.ndarray]]:
    d = tmp_path / "TinyLlama-Test"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(1)
    e, ff, h, hk, v = (cfg[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                         "num_key_value_heads", "vocab_size"))
    hd = e // h
    w = {"model.embed_tokens.weight": (v, e), "model.norm.weight": (e,), "lm_head.weight": (v, e)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w |= {p + "self_attn.q_proj.weight": (e, e), p + "self_attn.k_proj.weight": (hk * hd, e),
              p + "self_attn.v_proj.weight": (hk * hd, e), p + "self_attn.o_proj.weight": (e, e),
              p + "mlp.gate_proj.weight": (ff, e), p + "mlp.up_proj.weight": (ff, e),
              p + "mlp.down_proj.weight": (e, ff), p + "input_layernorm.weight": (e,),
              p + "post_attention_layernorm.weight": (e,)}
    arrays = {k: rng.standard_normal(s).astype(np.float32) for k, s in w.items()}
    save_file(arrays, str(d / "model.safetensors"))
    return d, arrays


def _torch_permute(weights: torch.Tensor, n_head: int, n_head_kv: int | None) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2)
            .reshape(weights.shape))


def test_permute_known_example():
    # 2 heads of 4 rows: within each head the rotate-half layout [a0 a1 b0 b1] becomes interleaved [a0 b0 a1 b1]
    w = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    got = permute_qk(w, 2, 2)[:, 0]
    assert got.tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    rng = np.random.default_rng(0)
    for n_head, n_kv, rows in [(4, 2, 8), (4, 4, 16), (8, 2, 16)]:
        x = rng.standard_normal((rows, 5)).astype(np.float32)
        np.testing.assert_array_equal(permute_qk(x, n_head, n_kv),
                                      _torch_permute(torch.from_numpy(x), n_head, n_kv).numpy())


def test_hf_llama_plan(tmp_path):
    d, arrays = _hf_folder(tmp_path)
    with open_safetensors_checkpoint(d) as ck:
        plan = plan_model(ck)
        names = [t.name for t in plan.tensors]
        assert plan.arch == "llama"
        assert "token_embd.weight" in names and "output.weight" in names and "blk.1.ffn_down.weight" in names
        assert len(names) == len(arrays)
        by = {t.name: t for t in plan.tensors}
        np.testing.assert_array_equal(by["blk.0.attn_q.weight"].read(),
                                      permute_qk(arrays["model.layers.0.self_attn.q_proj.weight"], 4, 4))
        np.testing.assert_array_equal(by["blk.1.attn_k.weight"].read(),
                                      permute_qk(arrays["model.layers.1.self_attn.k_proj.weight"], 4, 2))
        np.testing.assert_array_equal(by["blk.0.attn_v.weight"].read(),
                                      arrays["model.layers.0.self_attn.v_proj.weight"])
        kv = {k.key: k.value for k in plan.kv}
        assert list(kv)[:2] == ["general.architecture", "general.type"]
        assert kv["general.architecture"] == "llama"
        assert kv["llama.block_count"] == 2 and kv["llama.context_length"] == 64
        assert kv["llama.embedding_length"] == 16 and kv["llama.feed_forward_length"] == 32
        assert kv["llama.attention.head_count"] == 4 and kv["llama.attention.head_count_kv"] == 2
        assert kv["llama.rope.freq_base"] == 500000.0 and kv["llama.attention.layer_norm_rms_epsilon"] == 1e-5
        assert kv["llama.vocab_size"] == 24 and kv["llama.rope.dimension_count"] == 4
        assert "general.name" in kv
        assert not any(k.startswith("tokenizer.") or k in ("general.file_type", "general.quantization_version")
                       for k in kv)
        assert {k: plan.hparams[k] for k in ("n_layer", "n_embd", "n_head", "n_head_kv", "n_ff", "n_vocab",
                                              "n_expert")} == {"n_layer": 2, "n_embd": 16, "n_head": 4,
                                                               "n_head_kv": 2, "n_ff": 32, "n_vocab": 24, "n_expert": 0}


def test_llama3_rope_freqs(tmp_path):
    cfg = CFG | {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}}
    d, _ = _hf_folder(tmp_path, cfg)
    with open_safetensors_checkpoint(d) as ck:
        plan = plan_model(ck)
    assert plan.tensors[0].name == "rope_freqs.weight" and plan.tensors[0].shape == (2,)
    # head_dim 4: freqs [1, 500000**-0.5]; wavelengths 2*pi (smoothed between 16/4 and 16/1) and ~4443 (> 16 -> 8)
    smooth = (16 / (2 * np.pi) - 1.0) / 3.0
    np.testing.assert_allclose(plan.tensors[0].read(), [1 / ((1 - smooth) / 8 + smooth), 8.0], rtol=1e-6)


def test_unknown_arch_and_generic(tmp_path):
    d, arrays = _hf_folder(tmp_path, CFG | {"architectures": ["FancyNetForCausalLM"]})
    with open_safetensors_checkpoint(d) as ck:
        with pytest.raises(CheckpointError, match="FancyNetForCausalLM.*--generic"):
            plan_model(ck)
        plan = plan_model(ck, generic=True)
    assert plan.arch == GENERIC_ARCH
    assert sorted(t.name for t in plan.tensors) == sorted(arrays)
    assert all(t.transform is None for t in plan.tensors)
    long = Checkpoint(tmp_path, "safetensors", [], [SourceTensor("x" * 64, (2,), "F32", lambda: np.zeros(2))])
    with pytest.raises(CheckpointError, match="64 bytes"):
        plan_model(long, generic=True)


def test_gguf_passthrough(tmp_path):
    from gguf.constants import GGUFValueType as T
    kvs = [KV("general.architecture", "llama", T.STRING), KV("general.file_type", 1, T.UINT32),
           KV("general.quantization_version", 2, T.UINT32), KV("quantgate.source_sha256", "x", T.STRING),
           KV("llama.block_count", 3, T.UINT32), KV("llama.attention.head_count", [8, 8, 8], T.ARRAY, T.UINT32),
           KV("llama.attention.head_count_kv", 2, T.UINT32), KV("tokenizer.ggml.tokens", ["a", "b"], T.ARRAY, T.STRING)]
    ts = [SourceTensor("token_embd.weight", (2, 4), "Q8_0", lambda: np.zeros((2, 4)))]
    plan = plan_model(Checkpoint(tmp_path / "m.gguf", "gguf", [], ts, gguf_kv=kvs))
    assert plan.arch == "llama" and [t.name for t in plan.tensors] == ["token_embd.weight"]
    assert [k.key for k in plan.kv] == ["general.architecture", "llama.block_count", "llama.attention.head_count",
                                        "llama.attention.head_count_kv", "tokenizer.ggml.tokens"]
    assert plan.hparams["n_head"] == 8 and plan.hparams["n_head_kv"] == 2 and plan.hparams["n_vocab"] == 2
