"""The inverse of quant/model_plan.py for llama-family GGUFs: KVs -> a transformers config dict, tensors -> an HF
state dict (GGUF names mapped back through gguf.TensorNameMap, the Q/K RoPE permutation undone, stacked MoE
experts un-stacked back to one 2-D weight per expert as HF checkpoints store them, quantized data dequantized with
quant.dequantize one tensor at a time).

This lets a quantized GGUF run in transformers so its quality can be compared with the original checkpoint.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import gguf
import numpy as np

from core.errors import CheckpointError
from quant.api import dequantize
from quant.gguf_reader import GGUFFile, TensorInfo, read_gguf

#: GGUF architecture -> (HF architecture class name, HF model_type, attention bias by default, Q/K permuted);
#: a llama GGUF with experts is Mixtral (_MIXTRAL)
_ARCHS: dict[str, tuple[str, str, bool, bool]] = {
    "llama": ("LlamaForCausalLM", "llama", False, True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", True, False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False, False),
    "phi3": ("Phi3ForCausalLM", "phi3", False, False),
    "gemma2": ("Gemma2ForCausalLM", "gemma2", False, False),
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", False, False),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe", True, False),
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe", False, False),
}
_MIXTRAL = ("MixtralForCausalLM", "mixtral", False, True)
#: stacked expert tensor (GGUF suffix) -> HF per-expert weight, for Mixtral and for the Qwen MoE families
_EXPERT_NAMES = {
    "mixtral": {"ffn_gate_exps": "block_sparse_moe.experts.{x}.w1", "ffn_down_exps": "block_sparse_moe.experts.{x}.w2",
                "ffn_up_exps": "block_sparse_moe.experts.{x}.w3"},
    "qwen": {"ffn_gate_exps": "mlp.experts.{x}.gate_proj", "ffn_down_exps": "mlp.experts.{x}.down_proj",
             "ffn_up_exps": "mlp.experts.{x}.up_proj"},
}
_LAYER_TEMPLATES = (
    "model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.bias",
    "model.layers.{i}.self_attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.bias",
    "model.layers.{i}.self_attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.bias",
    "model.layers.{i}.self_attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.bias",
    "model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight",
    "model.layers.{i}.mlp.down_proj.weight",
    "model.layers.{i}.input_layernorm.weight", "model.layers.{i}.post_attention_layernorm.weight",
    "model.layers.{i}.pre_feedforward_layernorm.weight", "model.layers.{i}.post_feedforward_layernorm.weight",
    "model.layers.{i}.self_attn.qkv_proj.weight", "model.layers.{i}.mlp.gate_up_proj.weight",
    "model.layers.{i}.self_attn.q_norm.weight", "model.layers.{i}.self_attn.k_norm.weight",
    "model.layers.{i}.block_sparse_moe.gate.weight", "model.layers.{i}.mlp.gate.weight",
    "model.layers.{i}.mlp.shared_expert.gate_proj.weight", "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "model.layers.{i}.mlp.shared_expert.down_proj.weight", "model.layers.{i}.mlp.shared_expert_gate.weight",
)
_GLOBAL_NAMES = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")


@dataclass(frozen=True)
class HFTensorMap:
    """How each GGUF tensor becomes an HF tensor: the HF name and which Q/K un-permutation (if any) applies."""

    hf_name: dict[str, str]            # GGUF name -> HF name (for stacked experts: a template with {x})
    unpermute_heads: dict[str, int]    # GGUF name -> head count for the inverse RoPE permutation (Q/K only)
    experts: frozenset[str] = frozenset()  # GGUF names of stacked (n_expert, rows, cols) expert tensors
    norm_minus_one: bool = False           # Gemma: norms are stored as 1 + w


def unpermute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """Inverse of model_plan.permute_qk: llama.cpp's interleaved RoPE row order back to HF's rotate-half order."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _kv(g: GGUFFile, key: str, default: Any = None) -> Any:
    v = g.value(key, default)
    if isinstance(v, (list, tuple, np.ndarray)) and not isinstance(v, str):
        return v[0] if len(v) else default  # per-layer arrays: layer 0, as llama.cpp's n_head() does
    return v


def _arch(g: GGUFFile) -> str:
    arch = g.value("general.architecture")
    if arch not in _ARCHS:
        raise CheckpointError(f"{g.path}: architecture {arch!r} cannot be mapped back to transformers "
                              f"(supported: {', '.join(sorted(_ARCHS))})")
    return str(arch)


def _hf_arch(g: GGUFFile, arch: str) -> tuple[str, str, bool, bool]:
    if arch == "llama" and int(_kv(g, "llama.expert_count", 0) or 0) > 0:
        return _MIXTRAL
    return _ARCHS[arch]


def hf_config_from_gguf(g: GGUFFile) -> dict[str, Any]:
    """A transformers config dict (LlamaConfig / Qwen2Config keys) rebuilt from the GGUF's hyperparameter KVs."""
    arch = _arch(g)
    cls_name, model_type, default_bias, _ = _hf_arch(g, arch)
    names = {t.name for t in g.tensors}

    def need(suffix: str) -> Any:
        v = _kv(g, f"{arch}.{suffix}")
        if v is None:
            raise CheckpointError(f"{g.path}: GGUF lacks {arch}.{suffix}")
        return v

    n_embd, n_head = int(need("embedding_length")), int(need("attention.head_count"))
    n_vocab = _kv(g, f"{arch}.vocab_size")
    if n_vocab is None:
        toks = g.value("tokenizer.ggml.tokens")
        n_vocab = len(toks) if toks is not None else g.tensor("token_embd.weight").shape[0]
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": float(_kv(g, f"{arch}.rope.freq_base", 10000.0))}
    scaling = _kv(g, f"{arch}.rope.scaling.type")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(need("rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise CheckpointError(f"{g.path}: rope scaling {scaling!r} cannot be mapped back to transformers")
    if "rope_freqs.weight" in names:
        raise CheckpointError(f"{g.path}: llama3 rope_freqs cannot be mapped back to a transformers config")
    cfg: dict[str, Any] = {
        "architectures": [cls_name],
        "model_type": model_type,
        "vocab_size": int(n_vocab),
        "hidden_size": n_embd,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": int(_kv(g, f"{arch}.attention.head_count_kv", n_head)),
        "head_dim": int(_kv(g, f"{arch}.attention.key_length", n_embd // n_head)),
        "max_position_embeddings": int(_kv(g, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_kv(g, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names if names else default_bias,
        "hidden_act": "silu",
    }
    for key, hf_key in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id",
                                                                         "eos_token_id")):
        if (v := g.value(key)) is not None:
            cfg[hf_key] = int(v)
    if model_type in ("qwen2", "qwen2_moe", "qwen3", "qwen3_moe"):
        cfg["use_sliding_window"] = False
    if model_type in ("qwen3", "qwen3_moe"):
        cfg["attention_bias"] = "blk.0.attn_q.bias" in names
    if model_type == "phi3":
        rope_dim = int(_kv(g, "phi3.rope.dimension_count", n_embd // n_head))
        rope["partial_rotary_factor"] = rope_dim * n_head / n_embd
        if "rope_factors_long.weight" in names or "rope_factors_short.weight" in names:
            rope.update(_phi3_longrope(g, rope_dim, int(need("rope.scaling.original_context_length")),
                                       int(_kv(g, "phi3.context_length", 0) or 0)))
        cfg.update(original_max_position_embeddings=int(need("rope.scaling.original_context_length")),
                   sliding_window=int(_kv(g, "phi3.attention.sliding_window", 0) or 0) or None,
                   pad_token_id=g.value("tokenizer.ggml.padding_token_id"))
    if model_type == "gemma2":  # llama.cpp scales queries by 1/sqrt(head_dim) (the 2B/9B setting)
        cfg.update(query_pre_attn_scalar=cfg["head_dim"], hidden_activation="gelu_pytorch_tanh",
                   attn_logit_softcapping=float(need("attn_logit_softcapping")),
                   final_logit_softcapping=float(need("final_logit_softcapping")),
                   sliding_window=int(need("attention.sliding_window")), tie_word_embeddings=True)
    if model_type == "gemma3_text":  # llama.cpp: every 6th layer global (swa pattern 6), the rest sliding
        n_layer = cfg["num_hidden_layers"]
        local = float(_kv(g, "gemma3.rope.freq_base_swa", 10000.0))
        cfg.update(query_pre_attn_scalar=cfg["head_dim"], hidden_activation="gelu_pytorch_tanh",
                   sliding_window=int(need("attention.sliding_window")), tie_word_embeddings=True,
                   final_logit_softcapping=(float(v) if (v := _kv(g, "gemma3.final_logit_softcapping")) else None),
                   layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layer)],
                   rope_parameters={"full_attention": rope, "sliding_attention": {"rope_type": "default",
                                                                                  "rope_theta": local}})
    if model_type == "mixtral":
        cfg.update(num_local_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                   sliding_window=None)
    elif model_type in ("qwen2_moe", "qwen3_moe"):
        # llama.cpp's qwen2moe graph uses the raw softmax weights of the top-k experts, its qwen3moe graph
        # renormalizes them: the config says what the GGUF computes
        cfg.update(num_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")),
                   moe_intermediate_size=int(need("expert_feed_forward_length")), decoder_sparse_step=1,
                   mlp_only_layers=[], norm_topk_prob=model_type == "qwen3_moe")
        if model_type == "qwen2_moe":
            cfg.update(shared_expert_intermediate_size=int(need("expert_shared_feed_forward_length")),
                       qkv_bias="blk.0.attn_q.bias" in names)
    return cfg


#: GGUF tensors that are config in transformers (Phi-3 LongRoPE's factors: rope_parameters long/short_factor)
_CONFIG_TENSORS = frozenset({"rope_factors_long.weight", "rope_factors_short.weight"})


def _phi3_longrope(g: GGUFFile, rope_dim: int, n_ctx_orig: int, n_ctx: int) -> dict[str, Any]:
    """Phi-3 LongRoPE back from the GGUF: rope_factors_long/short (F32, rope_dim / 2 values each, the converter's
    generate_extra_tensors) -> transformers' longrope rope_parameters. The attention factor is given only when the
    file's differs from the one transformers derives (the converter writes that same formula)."""
    by_name = {t.name: t for t in g.tensors}
    factors: dict[str, list[float]] = {}
    for key, name in (("long_factor", "rope_factors_long.weight"), ("short_factor", "rope_factors_short.weight")):
        t = by_name.get(name)
        if t is None or t.qtype != "F32" or list(t.shape) != [rope_dim // 2]:
            raise CheckpointError(f"{g.path}: LongRoPE needs {name} as F32 of {rope_dim // 2} values (rope dimension "
                                  f"{rope_dim}), got {'none' if t is None else f'{t.qtype} {list(t.shape)}'}")
        vals = read_tensor_f32(g, t).reshape(-1)
        if not (np.isfinite(vals).all() and (vals > 0).all()):
            raise CheckpointError(f"{g.path}: {name} must hold finite positive factors")
        factors[key] = [float(v) for v in vals]
    out: dict[str, Any] = {"rope_type": "longrope", **factors}
    scale = n_ctx / n_ctx_orig if n_ctx_orig > 1 and n_ctx > 0 else 1.0
    derived = math.sqrt(1 + math.log(scale) / math.log(n_ctx_orig)) if scale > 1.0 else 1.0
    attn = _kv(g, "phi3.rope.scaling.attn_factor")
    if attn is not None and np.float32(attn) != np.float32(derived):
        if not (math.isfinite(float(attn)) and float(attn) > 0):
            raise CheckpointError(f"{g.path}: phi3.rope.scaling.attn_factor must be a finite positive number")
        out["attention_factor"] = float(attn)
    return out


def hf_tensor_map(g: GGUFFile, config: dict[str, Any]) -> HFTensorMap:
    """Map every GGUF tensor to its HF name (the exact inverse of model_plan's TensorNameMap lookup)."""
    arch = _arch(g)
    _, model_type, _, permuted = _hf_arch(g, arch)
    n_layer = int(config["num_hidden_layers"])
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layer)
    # the router is block_sparse_moe.gate in Mixtral checkpoints, mlp.gate in the Qwen MoE ones
    templates = [t for t in _LAYER_TEMPLATES if ("block_sparse_moe" in t) == (model_type == "mixtral")
                 or not t.endswith(("moe.gate.weight", "mlp.gate.weight"))]
    if model_type == "phi3":  # attn_qkv / ffn_up are Phi-3's fused qkv_proj / gate_up_proj
        templates.sort(key=lambda t: not t.endswith(("qkv_proj.weight", "gate_up_proj.weight")))
    candidates = list(_GLOBAL_NAMES) + [t.format(i=i) for i in range(n_layer) for t in templates]
    inverse: dict[str, str] = {}
    for hf in candidates:
        gg = name_map.get_name(key=hf, try_suffixes=(".weight", ".bias"))
        if gg is not None:
            inverse.setdefault(gg, hf)
    experts: set[str] = set()
    family = "mixtral" if model_type == "mixtral" else "qwen"
    for i in range(n_layer):
        for suffix, hf in _EXPERT_NAMES[family].items():
            inverse[f"blk.{i}.{suffix}.weight"] = f"model.layers.{i}.{hf}.weight"
            experts.add(f"blk.{i}.{suffix}.weight")
    heads: dict[str, int] = {}
    hf_name: dict[str, str] = {}
    n_head, n_head_kv = int(config["num_attention_heads"]), int(config["num_key_value_heads"])
    for t in g.tensors:
        if model_type == "phi3" and t.name in _CONFIG_TENSORS:
            continue  # read into the config by hf_config_from_gguf
        if t.name in experts and len(t.shape) != 3:
            raise CheckpointError(f"{g.path}: expert tensor {t.name!r} has shape {list(t.shape)}; expected "
                                  "(n_expert, rows, cols)")
        if t.name not in inverse:
            raise CheckpointError(f"{g.path}: tensor {t.name!r} has no transformers counterpart for {arch!r}")
        hf = inverse[t.name]
        hf_name[t.name] = hf
        if permuted and hf.endswith(("q_proj.weight", "q_proj.bias")):
            heads[t.name] = n_head
        elif permuted and hf.endswith(("k_proj.weight", "k_proj.bias")):
            heads[t.name] = n_head_kv
    return HFTensorMap(hf_name, heads, frozenset(n for n in hf_name if n in experts),
                       model_type in ("gemma2", "gemma3_text"))


def read_tensor_f32(g: GGUFFile, t: TensorInfo) -> np.ndarray:
    """One GGUF tensor as float32 of its numpy-order shape, dequantized with quant.dequantize; the tensor's mapped
    pages are dropped once it is copied out (GGUFFile.release), so reading a model tensor by tensor (a layer-
    streamed pass, the tensor-error check) keeps about one tensor of the file resident, not every page read."""
    raw = g.tensor_data(t)
    out = dequantize(raw, t.qtype, t.shape or (1,)).reshape(t.shape)
    if np.shares_memory(out, raw):
        out = out.copy()  # never hand out a view of the mapped file
    del raw
    g.release(t)
    return out


def iter_hf_tensors(g: GGUFFile, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (HF name, float32 array) for each GGUF tensor, one at a time (bounded memory), Q/K un-permuted; a
    stacked expert tensor yields one (rows, cols) weight per expert, under the names HF checkpoints use."""
    tmap = hf_tensor_map(g, config)
    for t in g.tensors:
        if t.name in tmap.hf_name:  # others are config, not weights (LongRoPE factors)
            yield from hf_tensors_of(g, tmap, t)


def hf_tensors_of(g: GGUFFile, tmap: HFTensorMap, t: TensorInfo) -> Iterator[tuple[str, np.ndarray]]:
    """The (HF name, float32 array) pairs one mapped GGUF tensor stands for: itself, Q/K un-permuted, Gemma's norm
    shift undone, or one (rows, cols) weight per expert of a stacked expert tensor (shared by iter_hf_tensors and
    the layer-streamed runtime, which reads one block's tensors at a time)."""
    yield from hf_arrays_of(tmap, t.name, read_tensor_f32(g, t))


def hf_arrays_of(tmap: HFTensorMap, gguf_name: str, arr: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """hf_tensors_of for a mapped GGUF tensor already read as float32 (`arr`, GGUF layout): the (HF name, array)
    pairs it stands for (used by the quantize loop's fingerprint, which reads each tensor once for both jobs)."""
    if gguf_name in tmap.unpermute_heads:
        arr = unpermute_qk(arr, tmap.unpermute_heads[gguf_name], tmap.unpermute_heads[gguf_name])
    name = tmap.hf_name[gguf_name]
    if gguf_name in tmap.experts:
        for x in range(arr.shape[0]):
            yield name.format(x=x), arr[x]
    elif name.endswith("shared_expert_gate.weight"):
        yield name, arr.reshape(1, -1)  # (1, n_embd): llama-quantize writes it 1-D (ggml_n_dims)
    elif tmap.norm_minus_one and name.endswith("norm.weight"):
        yield name, arr - np.float32(1)  # Gemma stores 1 + w (the converter's norm shift)
    else:
        yield name, arr


def gguf_to_hf(path: "str | os.PathLike[str]") -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Convenience for small models: (transformers config dict, full float32 HF state dict) of a GGUF file."""
    with read_gguf(Path(path)) as g:
        cfg = hf_config_from_gguf(g)
        return cfg, dict(iter_hf_tensors(g, cfg))
