"""What the output GGUF contains independent of quantization: architecture, metadata KVs and the tensor list.

For HF sources this follows the pinned llama.cpp convert_hf_to_gguf.py (LlamaModel / Qwen2Model): tensor names
through gguf.TensorNameMap, the Q/K RoPE permutation, llama3 rope_freqs, and the hyperparameter KVs in the order
the converter adds them, followed by the tokenizer KVs (quant.tokenizer_gguf) so the GGUF runs in llama.cpp.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import gguf
import numpy as np
from gguf.constants import GGUFValueType

from core.errors import CheckpointError
from quant.gguf_kv import KV
from quant.loaders.base import Checkpoint, SourceTensor
from quant.tokenizer_gguf import TokenizerExport, kv_from_writer, sentencepiece_vocab, tokenizer_kvs

GENERIC_ARCH = "quantgate-generic"
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
_PIPELINE_KEYS = ("general.file_type", "general.quantization_version")
_GGUF_INT_HPARAMS = (".block_count", ".embedding_length", ".attention.head_count", ".attention.head_count_kv",
                     ".feed_forward_length", ".vocab_size", ".expert_count")
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")
# TextModel.filter_tensors' multimodal test (prefixes, then substrings): such tensors are not the text model's
_MM_PREFIXES = ("mlp", "vit.", "vpm.", "siglip2.", "conformer.", "merger.", "resampler.", "sound_encoder.",
                "sound_projection.", "speech_embeddings.")
_MM_SUBSTRINGS = ("visual.", "vision.", "audio.", "talker.", "vision_", "audio_", "token2wav.", "code2wav.",
                  "projector.", "pre_mm_projector_norm", "image_newline", "view_seperator", "patch_embed",
                  "patch_embedding", "patch_merger.", "patch_merge_mlp.", "model.connector.")


@dataclass
class PlannedTensor:
    """One output tensor: GGUF name, numpy-order shape, where its data comes from and an optional data transform."""

    name: str
    shape: tuple[int, ...]
    source: SourceTensor
    transform: Callable[[np.ndarray], np.ndarray] | None = None

    def read(self) -> np.ndarray:
        """The tensor's float32 data as it goes into the GGUF (source read, then transform)."""
        arr = self.source.read()
        if self.transform is not None:
            arr = self.transform(arr)
        return np.ascontiguousarray(arr, dtype=np.float32).reshape(self.shape)


@dataclass
class ModelPlan:
    """Output architecture, KVs (minus general.file_type / general.quantization_version / quantgate.*), tensors in
    output order, and the hyperparameters the quantization mixes look at."""

    arch: str
    kv: list[KV]
    tensors: list[PlannedTensor]
    hparams: dict[str, Any] = field(default_factory=dict)
    source_kind: str = "gguf"  # Checkpoint.kind of the source: decides the pre-quantization type of kept tensors
    # HF sources: where convert_hf_to_gguf puts general.file_type in `kv`, and the tokenizer KVs that end `kv`
    file_type_index: int | None = None
    tokenizer: TokenizerExport | None = None

    def converter_kv(self, file_type: int, quantization_version: int) -> list[KV]:
        """`kv` with general.file_type and general.quantization_version where convert_hf_to_gguf.py writes them
        (file_type at the end of the generic hyperparameters, quantization_version just before the tokenizer)."""
        if self.file_type_index is None:
            raise ValueError("converter KV order is only defined for HF sources")
        n_tok = len(self.tokenizer.kv) if self.tokenizer else 0
        cut = len(self.kv) - n_tok
        return (self.kv[:self.file_type_index]
                + [KV("general.file_type", file_type, GGUFValueType.UINT32)]
                + self.kv[self.file_type_index:cut]
                + [KV("general.quantization_version", quantization_version, GGUFValueType.UINT32)]
                + self.kv[cut:])


@dataclass(frozen=True)
class _Experts:
    """How a converter class stacks per-expert 2-D weights into one 3-D tensor per projection and block: the HF
    name of one expert's weight (regex groups: block, expert, projection), the projections in the order the
    converter emits them, and the HF name of the stacked tensor it maps through TensorNameMap."""

    pattern: re.Pattern[str]
    trigger: str           # the substring that routes a tensor to the expert buffer (the converter's test)
    projections: tuple[str, ...]
    merged: str            # format string with {bid} and {w}


_MIXTRAL_EXPERTS = _Experts(
    re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight$"),
    "block_sparse_moe.experts", ("w1", "w2", "w3"), "layers.{bid}.feed_forward.experts.{w}.weight")
_QWEN_EXPERTS = _Experts(
    re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(down_proj|gate_proj|up_proj)\.weight$"),
    "experts", ("down_proj", "gate_proj", "up_proj"), "model.layers.{bid}.mlp.experts.{w}.weight")


@dataclass(frozen=True)
class _HFArch:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool
    llama_extras: bool  # vocab_size + rope_dimension_count KVs and llama3 rope_freqs (LlamaModel only)
    defaults: dict[str, Any]
    experts: _Experts | None = None
    moe_ff_kvs: bool = False  # Qwen2MoeModel: expert (shared) feed-forward lengths after the generic KVs
    fill_head_dim: bool = False  # LlamaConfig / MistralConfig set head_dim = hidden // heads when it is absent
    params: str = "text"  # which set_gguf_parameters: TextModel's, Phi3MiniModel's ("phi3"), Gemma2Model's
    norm_plus_one: bool = False  # Gemma: every *norm.weight is stored as 1 + w (HF's RMSNorm multiplies by 1 + w)
    skip_lm_head: bool = False   # Gemma: lm_head.weight is dropped (the embeddings are always tied)
    trim_embeddings: bool = False  # Gemma 3: token_embd rows beyond the tokenizer's vocabulary are dropped
    skip_multimodal: bool = False  # multimodal checkpoints: TextModel.filter_tensors drops the vision/audio tensors


_LLAMA_DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_QWEN_DEFAULTS = {"vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_HF_ARCHS: dict[str, _HFArch] = {
    "LlamaForCausalLM": _HFArch(gguf.MODEL_ARCH.LLAMA, True, True, _LLAMA_DEFAULTS, fill_head_dim=True),
    "LLaMAForCausalLM": _HFArch(gguf.MODEL_ARCH.LLAMA, True, True, _LLAMA_DEFAULTS, fill_head_dim=True),
    "MistralForCausalLM": _HFArch(gguf.MODEL_ARCH.LLAMA, True, True,
                                  {**_LLAMA_DEFAULTS, "max_position_embeddings": 4096 * 32}, fill_head_dim=True),
    "MixtralForCausalLM": _HFArch(gguf.MODEL_ARCH.LLAMA, True, True,
                                  {**_LLAMA_DEFAULTS, "max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-5,
                                   "rope_theta": 1e6, "num_local_experts": 8, "num_experts_per_tok": 2},
                                  experts=_MIXTRAL_EXPERTS),
    "Qwen2ForCausalLM": _HFArch(gguf.MODEL_ARCH.QWEN2, False, False, _QWEN_DEFAULTS),
    "Qwen2MoeForCausalLM": _HFArch(gguf.MODEL_ARCH.QWEN2MOE, False, False,
                                   {**_QWEN_DEFAULTS, "num_experts": 60, "num_experts_per_tok": 4,
                                    "moe_intermediate_size": 1408, "shared_expert_intermediate_size": 5632},
                                   experts=_QWEN_EXPERTS, moe_ff_kvs=True),
    "Phi3ForCausalLM": _HFArch(gguf.MODEL_ARCH.PHI3, False, False,
                               {"vocab_size": 32064, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
                                "rope_theta": 10000.0, "original_max_position_embeddings": 4096},
                               params="phi3"),
    "Gemma2ForCausalLM": _HFArch(gguf.MODEL_ARCH.GEMMA2, False, False,
                                 {"vocab_size": 256000, "max_position_embeddings": 8192, "rms_norm_eps": 1e-6,
                                  "rope_theta": 10000.0, "head_dim": 256, "attn_logit_softcapping": 50.0,
                                  "final_logit_softcapping": 30.0, "sliding_window": 4096},
                                 params="gemma2", norm_plus_one=True, skip_lm_head=True),
    "Gemma3ForCausalLM": _HFArch(gguf.MODEL_ARCH.GEMMA3, False, False,
                                 {"vocab_size": 262208, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
                                  "head_dim": 256, "sliding_window": 4096},
                                 params="gemma3", norm_plus_one=True, trim_embeddings=True),
    # Gemma 3 4B+ (vision + text): Gemma3Model converts the text model (under language_model., config text_config,
    # Gemma3TextConfig's defaults), the SigLIP tower and projector are dropped (llama.cpp's mmproj is another file)
    "Gemma3ForConditionalGeneration": _HFArch(gguf.MODEL_ARCH.GEMMA3, False, False,
                                              {"vocab_size": 262208, "max_position_embeddings": 131072,
                                               "rms_norm_eps": 1e-6, "head_dim": 256, "sliding_window": 4096,
                                               "num_attention_heads": 8, "num_key_value_heads": 4,
                                               "intermediate_size": 9216, "hidden_size": 2304,
                                               "num_hidden_layers": 26, "rope_theta": 1_000_000.0,
                                               "rope_local_base_freq": 10000.0},
                                              params="gemma3", norm_plus_one=True, trim_embeddings=True,
                                              skip_multimodal=True),
    "Qwen3ForCausalLM": _HFArch(gguf.MODEL_ARCH.QWEN3, False, False, _QWEN_DEFAULTS),
    "Qwen3MoeForCausalLM": _HFArch(gguf.MODEL_ARCH.QWEN3MOE, False, False,
                                   {**_QWEN_DEFAULTS, "num_local_experts": 128, "num_experts_per_tok": 8,
                                    "moe_intermediate_size": 768},
                                   experts=_QWEN_EXPERTS, moe_ff_kvs=True),
}


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute: reorder rows of a Q/K projection from HF's rotate-half RoPE layout
    to llama.cpp's interleaved layout (heads of `n_head_kv` when it differs from `n_head`)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2)
            .reshape(w.shape))


def _first(d: dict, keys: tuple[str, ...]) -> Any:
    return next((d[k] for k in keys if k in d), None)


def _gguf_value(kvs: list[KV], key: str, default: Any = None) -> Any:
    for kv in kvs:
        if kv.key == key:
            v = kv.value
            if isinstance(v, (list, tuple)):
                return v[0] if v else default  # per-layer arrays: llama.cpp's n_head() etc. read layer 0
            return v
    return default


# ---------------------------------------------------------------------------------------------------------------
# Semantic checks: does a tensor list + hyperparameters describe a model llama.cpp can build? (docs/security/
# semantic-checks.md). Used on GGUF files by quant.verify and on HF checkpoints while planning, before any data
# is read.

#: architectures whose required tensors and shapes are checked (llama.cpp's llama / qwen2 loaders)
CHECKED_ARCHS = ("llama", "qwen2", "qwen2moe", "qwen3", "qwen3moe", "gemma2", "gemma3", "phi3")
MAX_HPARAM_INT = 2**31 - 1          # llama.cpp keeps every hyperparameter in an int32_t / uint32_t
_BLOCK = re.compile(r"^blk\.(\d+)\.")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _is_pos_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)) and 1 <= x <= MAX_HPARAM_INT


def _as_list(v: Any) -> list:
    return list(v) if isinstance(v, (list, tuple, np.ndarray)) else [v]


def _hp_int(kv: dict[str, Any], key: str, problems: list[str], *, required: bool) -> int | None:
    """A positive integer hyperparameter; None, with a problem added, when absent-but-required or not one."""
    if key not in kv:
        if required:
            problems.append(f"{key} is missing")
        return None
    if not _is_pos_int(kv[key]):
        problems.append(f"{key} must be a positive integer, got {_short(kv[key])}")
        return None
    return int(kv[key])


def _hp_layers(kv: dict[str, Any], key: str, problems: list[str], n_layer: int, *,
               required: bool) -> list[int] | None:
    """A per-layer hyperparameter (a scalar, or an array with one positive integer per block) as n_layer values."""
    if key not in kv:
        if required:
            problems.append(f"{key} is missing")
        return None
    v = kv[key]
    if not isinstance(v, (list, tuple, np.ndarray)):
        return [x] * n_layer if (x := _hp_int(kv, key, problems, required=required)) is not None else None
    vals = list(v)
    if len(vals) != n_layer or not all(_is_pos_int(x) for x in vals):
        problems.append(f"{key} must be a positive integer or one per block ({n_layer}), got {_short(v)}")
        return None
    return [int(x) for x in vals]


def _short(v: Any) -> str:
    s = repr(v.tolist() if isinstance(v, np.ndarray) else v)
    return s if len(s) <= 60 else s[:57] + "..."


def _hp_positive_float(kv: dict[str, Any], key: str, problems: list[str]) -> None:
    if key in kv and not all(_is_number(x) and math.isfinite(float(x)) and float(x) > 0 for x in _as_list(kv[key])):
        problems.append(f"{key} must be a finite positive number, got {_short(kv[key])}")


def check_architecture(arch: str, kv: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems that make the model unbuildable: zero tensors; for CHECKED_ARCHS (llama incl. mixtral, qwen2,
    qwen2moe, qwen3, qwen3moe, gemma2, gemma3, phi3) also a missing or
    non-positive/non-finite hyperparameter, a tensor a block needs that is absent, a shape that disagrees with the
    hyperparameters, a block beyond block_count, a tensor the architecture does not have. `shapes` are numpy-order
    (rows, cols); `kv` maps GGUF keys to values (per-layer arrays allowed). Other architectures: zero tensors only."""
    problems: list[str] = []
    if not shapes:
        return ["the model has no tensors"]
    if arch not in CHECKED_ARCHS:
        return problems
    n_layer = _hp_int(kv, f"{arch}.block_count", problems, required=True)
    if n_layer is not None and n_layer > len(shapes):
        problems.append(f"{arch}.block_count is {n_layer} but there are only {len(shapes)} tensors")
        return problems
    nl = n_layer or 1
    n_embd = _hp_int(kv, f"{arch}.embedding_length", problems, required=True)
    heads = _hp_layers(kv, f"{arch}.attention.head_count", problems, nl, required=True)
    heads_kv = _hp_layers(kv, f"{arch}.attention.head_count_kv", problems, nl, required=False) or heads
    ffs = _hp_layers(kv, f"{arch}.feed_forward_length", problems, nl, required=False)
    dk = _hp_int(kv, f"{arch}.attention.key_length", problems, required=False)
    dv = _hp_int(kv, f"{arch}.attention.value_length", problems, required=False)
    qwen_moe = arch in ("qwen2moe", "qwen3moe")
    n_expert = _hp_int(kv, f"{arch}.expert_count", problems, required=qwen_moe)
    # qwen2moe/qwen3moe (llama.cpp models/qwen*moe.cpp): expert width expert_feed_forward_length, else
    # n_ff / n_expert_used; qwen2moe's shared expert: expert_shared_feed_forward_length, else n_ff
    ff_exp = _hp_layers(kv, f"{arch}.expert_feed_forward_length", problems, n_layer or 1, required=False) \
        if qwen_moe else None
    used = _hp_int(kv, f"{arch}.expert_used_count", problems, required=qwen_moe)
    ff_shexp = _hp_int(kv, f"{arch}.expert_shared_feed_forward_length", problems, required=False) \
        if arch == "qwen2moe" else None
    for key in ("context_length", "vocab_size", "rope.dimension_count"):
        _hp_int(kv, f"{arch}.{key}", problems, required=False)
    for key in ("rope.freq_base", "rope.freq_scale", "rope.scaling.factor", "attention.layer_norm_rms_epsilon"):
        _hp_positive_float(kv, f"{arch}.{key}", problems)
    if heads and heads_kv:
        bad = next((i for i in range(nl) if heads[i] % heads_kv[i]), None)
        if bad is not None:
            problems.append(f"{arch}.attention.head_count {heads[bad]} is not a multiple of head_count_kv "
                            f"{heads_kv[bad]}" + (f" (block {bad})" if len(set(heads + heads_kv)) > 2 else ""))
    if n_embd and heads and (dk is None or dv is None) and n_embd % heads[0]:
        problems.append(f"{arch}.embedding_length {n_embd} is not divisible by head_count {heads[0]}")
    if n_layer is None or n_embd is None or heads is None or heads_kv is None or problems:
        return problems
    dk = dk or n_embd // heads[0]          # llama.cpp: n_embd_head_k = n_embd / n_head(layer 0)
    dv = dv or n_embd // heads[0]
    tokens = kv.get("tokenizer.ggml.tokens")
    n_vocab = len(tokens) if isinstance(tokens, (list, tuple, np.ndarray)) else None
    if n_vocab is None and _is_pos_int(kv.get(f"{arch}.vocab_size")):
        n_vocab = int(kv[f"{arch}.vocab_size"])
    if ffs is None and (g := shapes.get("blk.0.ffn_gate.weight")) is not None and len(g) == 2:
        ffs = [g[0]] * n_layer
    v, e = n_vocab, n_embd
    want: dict[str, tuple[int | None, ...]] = {"token_embd.weight": (v, e), "output_norm.weight": (e,)}
    optional: dict[str, tuple[int | None, ...]] = {"output.weight": (v, e), "rope_freqs.weight": (dk // 2,)}
    if arch == "qwen2moe":  # models/qwen2moe.cpp creates output without TENSOR_NOT_REQUIRED (no tied fallback)
        want["output.weight"] = optional.pop("output.weight")
    for i in range(n_layer):
        b, h, hk, ff = f"blk.{i}.", heads[i], heads_kv[i], (ffs[i] if ffs else None)
        ff_dense = ff
        if qwen_moe:
            ff = ff_exp[i] if ff_exp else (ff // used if ff and used else None)
        if arch in ("qwen3", "qwen3moe", "gemma3"):   # models/qwen3*.cpp, gemma3.cpp: per-head RMS norms of q and k
            want |= {b + "attn_q_norm.weight": (dk,), b + "attn_k_norm.weight": (dk,)}
        want |= {b + "attn_norm.weight": (e,), b + "attn_q.weight": (h * dk, e),
                 b + "attn_k.weight": (hk * dk, e), b + "attn_v.weight": (hk * dv, e),
                 b + "attn_output.weight": (e, h * dv), b + "ffn_norm.weight": (e,)}
        if n_expert:
            want |= {b + "ffn_gate_inp.weight": (n_expert, e), b + "ffn_gate_exps.weight": (n_expert, ff, e),
                     b + "ffn_up_exps.weight": (n_expert, ff, e), b + "ffn_down_exps.weight": (n_expert, e, ff)}
        else:
            want |= {b + "ffn_gate.weight": (ff, e), b + "ffn_up.weight": (ff, e), b + "ffn_down.weight": (e, ff)}
        if arch == "qwen2moe":  # models/qwen2moe.cpp: wq and wo are n_embd x n_embd; the shared expert and its gate
            fs = ff_shexp or ff_dense
            want |= {b + "attn_q.weight": (e, e), b + "attn_output.weight": (e, e),
                     b + "ffn_gate_inp_shexp.weight": (e,), b + "ffn_gate_shexp.weight": (fs, e),
                     b + "ffn_down_shexp.weight": (e, fs), b + "ffn_up_shexp.weight": (fs, e)}
        biases = {b + "attn_q.bias": (h * dk,), b + "attn_k.bias": (hk * dk,), b + "attn_v.bias": (hk * dv,)}
        (want if arch == "qwen2" else optional).update(biases)
        optional |= {b + "attn_output.bias": (e,)}
        if arch in ("gemma2", "gemma3"):   # models/gemma2.cpp, gemma3.cpp: norms after attention and after the FFN
            want |= {b + "post_attention_norm.weight": (e,), b + "post_ffw_norm.weight": (e,)}
        if arch == "phi3":   # models/phi3.cpp: fused qkv (or q/k/v), ffn_up holds gate and up, no ffn_gate
            for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight", "ffn_gate.weight"):
                optional[b + n] = want.pop(b + n)
            del optional[b + "ffn_gate.weight"]
            want[b + "ffn_up.weight"] = (2 * ff if ff else None, e)
            fused = b + "attn_qkv.weight"
            optional[fused] = (h * dk + 2 * hk * dk, e)
            if fused not in shapes:
                want |= {b + n: optional.pop(b + n) for n in ("attn_q.weight", "attn_k.weight", "attn_v.weight")}
    if arch == "phi3":   # LongRoPE factors: one pair for the model, n_rot / 2 each
        rot = kv.get(f"{arch}.rope.dimension_count")
        half = int(rot) // 2 if _is_pos_int(rot) else dk // 2
        optional |= {"rope_factors_long.weight": (half,), "rope_factors_short.weight": (half,)}
    known: set[str] | None = None
    missing = [n for n in want if n not in shapes]
    if missing:
        problems.append(f"{len(missing)} tensor(s) the {arch} architecture needs for {n_layer} blocks are missing "
                        f"(first: {', '.join(missing[:3])})")
    for name, shape in shapes.items():
        exp = want.get(name, optional.get(name))
        if exp is None:
            m = _BLOCK.match(name)
            if m and int(m.group(1)) >= n_layer:
                problems.append(f"tensor {name!r} belongs to block {m.group(1)} but {arch}.block_count is {n_layer}")
            elif name not in (known := known if known is not None else _arch_tensor_names(arch, n_layer)):
                problems.append(f"tensor {name!r} is not a tensor of the {arch} architecture")
            continue
        got = shape
        if len(got) > len(exp) and all(d == 1 for d in got[:len(got) - len(exp)]):
            got = got[len(got) - len(exp):]  # ggml pads ne with 1s: (1, n) is the vector {n} llama.cpp wants
        if len(got) != len(exp) or any(x is not None and x != s for x, s in zip(exp, got)):
            problems.append(f"tensor {name!r} has shape {list(shape)} but the hyperparameters give "
                            f"{[x if x is not None else '*' for x in exp]}")
    return problems


def _arch_tensor_names(arch: str, n_layer: int) -> set[str]:
    enum = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    out: set[str] = set()
    for t in gguf.MODEL_TENSORS[enum]:
        pattern = gguf.TENSOR_NAMES[t]
        bases = [pattern.format(bid=i) for i in range(n_layer)] if "{bid}" in pattern else [pattern]
        out |= {f"{b}.{s}" for b in bases for s in ("weight", "bias")}
    return out


def _plan_gguf(ckpt: Checkpoint) -> ModelPlan:
    arch = ckpt.architecture
    if not arch:
        raise CheckpointError(f"{ckpt.path}: GGUF file has no general.architecture")
    if not ckpt.tensors:
        raise CheckpointError(f"{ckpt.path}: the GGUF file has no tensors; nothing to quantize")
    kvs = [kv for kv in ckpt.gguf_kv if kv.key not in _PIPELINE_KEYS and not kv.key.startswith("quantgate.")]
    tensors = [PlannedTensor(t.name, t.shape, t) for t in ckpt.tensors]
    for kv in kvs:
        if kv.key.startswith(f"{arch}.") and kv.key.endswith(_GGUF_INT_HPARAMS):
            if not all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) and x >= 0
                       for x in _as_list(kv.value)):
                raise CheckpointError(f"{ckpt.path}: {kv.key} must be a non-negative integer, got {_short(kv.value)}")
    n_head = int(_gguf_value(kvs, f"{arch}.attention.head_count", 0))
    n_vocab = _gguf_value(kvs, f"{arch}.vocab_size")
    if n_vocab is None:
        toks = next((kv.value for kv in kvs if kv.key == "tokenizer.ggml.tokens"), None)
        n_vocab = len(toks) if toks is not None else next(
            (t.shape[0] for t in ckpt.tensors if t.name == "token_embd.weight"), 0)
    hparams = {
        "n_layer": int(_gguf_value(kvs, f"{arch}.block_count", 0)),
        "n_embd": int(_gguf_value(kvs, f"{arch}.embedding_length", 0)),
        "n_head": n_head,
        "n_head_kv": int(_gguf_value(kvs, f"{arch}.attention.head_count_kv", n_head)),
        "n_ff": int(_gguf_value(kvs, f"{arch}.feed_forward_length", 0)),
        "n_vocab": int(n_vocab),
        "n_expert": int(_gguf_value(kvs, f"{arch}.expert_count", 0)),
    }
    return ModelPlan(arch=arch, kv=kvs, tensors=tensors, hparams=hparams, source_kind=ckpt.kind)


def _hf_config(ckpt: Checkpoint) -> dict:
    cfg = dict(ckpt.config or {})
    for k in ("llm_config", "lm_config"):
        if k in cfg:
            cfg["text_config"] = cfg[k]
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    return cfg


def _rope_parameters(cfg: dict) -> dict:
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "full_attention" not in rope and "sliding_attention" not in rope:
        theta = _first(cfg, ("global_rope_theta", "rope_global_theta", "rope_theta_global", "rope_theta",
                             "rotary_emb_base"))
        if "rope_theta" not in rope and theta is not None:
            rope["rope_theta"] = theta
        local = _first(cfg, ("local_rope_theta", "rope_local_theta", "rope_theta_local", "swa_rope_theta",
                             "rope_local_base_freq"))
        if local is not None:
            rope["sliding_attention"] = {"rope_theta": local}
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
        partial = _first(cfg, ("partial_rotary_factor", "rope_pct", "rope_percent"))
        if "partial_rotary_factor" not in rope and partial is not None:
            rope["partial_rotary_factor"] = partial
        orig = cfg.get("original_max_position_embeddings")
        if "original_max_position_embeddings" not in rope and orig is not None:
            rope["original_max_position_embeddings"] = orig
    return rope


def _llama3_rope_freqs(cfg: dict, rope: dict) -> SourceTensor | None:
    params = rope.get("full_attention", rope)
    if not params or str(params.get("rope_type", "")).lower() != "llama3":
        return None
    dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]

    def read() -> np.ndarray:
        import torch  # exactly convert_hf_to_gguf's float32 torch arithmetic
        base = params.get("rope_theta", 10000.0)
        freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        factor = params.get("factor", 8.0)
        low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        old_ctx = params.get("original_max_position_embeddings", 8192)
        low_wl, high_wl = old_ctx / low, old_ctx / high
        out = []
        for freq in freqs:
            wavelen = 2 * math.pi / freq
            if wavelen < high_wl:
                out.append(1)
            elif wavelen > low_wl:
                out.append(factor)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append(1 / ((1 - smooth) / factor + smooth))
        return torch.tensor(out, dtype=torch.float32).numpy()

    return SourceTensor("rope_freqs.weight", (dim // 2,), "F32", read)


def _parameter_counts(tensors: list[PlannedTensor]) -> tuple[int, int, int, int]:
    """GGUFWriter.get_total_parameter_count: (total, shared, per-expert, expert count) of the output tensors, which
    the converter's general.size_label ("8x22M") and metadata derive from."""
    total = shared = expert = expert_sum = n_expert_tensors = 0
    for t in tensors:
        size = int(np.prod(t.shape, dtype=np.int64))
        if "_exps." in t.name and len(t.shape) >= 3:
            count = t.shape[-2 if ".bias" in t.name else -3]
            expert += size // count
            expert_sum += count
            n_expert_tensors += 1
        else:
            shared += size
        total += size
    return total, shared, expert, (expert_sum // n_expert_tensors) if n_expert_tensors else 0


def _stacked(name: str, parts: list[SourceTensor]) -> SourceTensor:
    """One (n_expert, rows, cols) source made of the experts' 2-D weights, read one projection at a time, as the
    converter's torch.stack(datas, dim=0)."""
    first = parts[0]
    for p in parts[1:]:
        if p.shape != first.shape or p.dtype != first.dtype:
            raise CheckpointError(f"expert tensors {first.name!r} {list(first.shape)} {first.dtype} and {p.name!r} "
                                  f"{list(p.shape)} {p.dtype} cannot be stacked (shapes and types must agree)")
    return SourceTensor(name, (len(parts), *first.shape), first.dtype,
                        lambda: np.stack([p.read() for p in parts], axis=0))


def _is_multimodal_part(name: str) -> bool:
    return name.startswith(_MM_PREFIXES) or any(s in name for s in _MM_SUBSTRINGS)


def text_model_name(config: "dict | None", name: str) -> str | None:
    """The HF name a checkpoint tensor has in the text model a GGUF of it holds, or None when the conversion drops
    it: a multimodal checkpoint's (Gemma3ForConditionalGeneration) vision tower and projector are dropped and its
    `language_model.` prefix removed; every other architecture keeps its names. Used by the weights fingerprint so
    such a checkpoint and its GGUF name the same weights."""
    archs = (config or {}).get("architectures") or []
    spec = _HF_ARCHS.get(archs[0]) if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if spec is None or not spec.skip_multimodal:
        return name
    return None if _is_multimodal_part(name) else name.replace("language_model.", "")


def _converter_tensors(ckpt: Checkpoint, spec: _HFArch, cfg: dict
                       ) -> Iterator[tuple[str, SourceTensor, Callable[[np.ndarray], np.ndarray] | None]]:
    """(HF name to map, source, transform) in the order the converter's modify_tensors yields them: skipped
    suffixes dropped, Q/K permuted (LlamaModel), per-expert weights buffered per block and stacked into one 3-D
    tensor per projection once all of that block's experts are seen (emitted where the last one is)."""
    n_head, n_head_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    ex = spec.experts
    n_experts = int(_first(cfg, _N_EXPERT_KEYS) or 0) if ex else 0
    buffers: dict[int, dict[tuple[int, str], SourceTensor]] = {}
    for t in ckpt.tensors:
        if spec.skip_multimodal and _is_multimodal_part(t.name):
            continue
        name = t.name.replace("language_model.", "")
        if name.endswith(_SKIP_SUFFIXES) or (spec.skip_lm_head and t.name == "lm_head.weight"):
            continue
        if ex is not None and ex.trigger in name:
            m = ex.pattern.match(name)
            if m is None or not n_experts or int(m.group(2)) >= n_experts:
                raise CheckpointError(f"{ckpt.path}: expert tensor {t.name!r} is not one of "
                                      f"{n_experts} experts' {'/'.join(ex.projections)} weights")
            bid, buf = int(m.group(1)), buffers.setdefault(int(m.group(1)), {})
            buf[(int(m.group(2)), m.group(3))] = t
            if len(buf) >= n_experts * len(ex.projections):
                for w in ex.projections:
                    merged = ex.merged.format(bid=bid, w=w)
                    yield merged, _stacked(merged, [buf.pop((x, w)) for x in range(n_experts)]), None
                del buffers[bid]
            continue
        transform = None
        if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            transform = lambda a, h=n_head: permute_qk(a, h, h)  # noqa: E731
        elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            transform = lambda a, h=n_head, hk=n_head_kv: permute_qk(a, h, hk)  # noqa: E731
        elif spec.norm_plus_one and name.endswith("norm.weight"):
            transform = _norm_plus_one(t.dtype)
        if spec.trim_embeddings and "embed_tokens.weight" in name and len(t.shape) == 2:
            model_dir = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
            rows = min(t.shape[0], _vocab_rows(model_dir, cfg.get("vocab_size")))
            if rows < t.shape[0]:
                t = SourceTensor(t.name, (rows, t.shape[1]), t.dtype, lambda t=t, r=rows: t.read()[:r])
        yield name, t, transform
    if buffers:
        left = [t.name for buf in buffers.values() for t in buf.values()]
        raise CheckpointError(f"{ckpt.path}: incomplete experts ({len(left)} expert tensors of a block left "
                              f"unstacked, first: {left[0]!r}); every block needs all {n_experts} experts")


def _hf_kvs(ckpt: Checkpoint, spec: _HFArch, cfg: dict, rope: dict,
            counts: tuple[int, int, int, int]) -> tuple[list[KV], int]:
    arch_name = gguf.MODEL_ARCH_NAMES[spec.gguf_arch]
    w = gguf.GGUFWriter(path=None, arch=arch_name)
    if spec.params == "phi3" and (lr := phi3_longrope(ckpt, cfg, rope)) is not None:
        w.add_rope_scaling_attn_factors(lr[0])  # generate_extra_tensors runs before the metadata: 2nd KV
    w.add_type(gguf.GGUFType.MODEL)
    model_dir = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    total, shared, expert, expert_count = counts
    meta = gguf.Metadata.load(None, model_dir, None, total)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and total > 0:
        meta.size_label = gguf.size_label(total, shared, expert, expert_count)
    meta.set_gguf_meta_model(w)
    file_type_index = {"phi3": _phi3_params, "gemma2": _gemma2_params, "gemma3": _gemma3_params}.get(
        spec.params, _text_params)(
        ckpt, w, cfg, rope)
    if spec.llama_extras:
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    if spec.moe_ff_kvs:
        if (n_ff_exp := cfg.get("moe_intermediate_size")) is not None:
            w.add_expert_feed_forward_length(n_ff_exp)
        if (n_ff_shexp := cfg.get("shared_expert_intermediate_size")) is not None:
            w.add_expert_shared_feed_forward_length(n_ff_shexp)
    kvs = [kv_from_writer(k, v) for k, v in w.kv_data[0].items() if k not in _PIPELINE_KEYS]
    return kvs, file_type_index


def _rope_factor_tensor(name: str, values: list) -> SourceTensor:
    arr = np.asarray(values, dtype=np.float32)  # torch.tensor(list, dtype=torch.float32): the same rounding
    return SourceTensor(name, arr.shape, "F32", lambda: arr.copy())


def phi3_longrope(ckpt: Checkpoint, cfg: dict, rope: dict) -> tuple[float, SourceTensor, SourceTensor] | None:
    """Phi3MiniModel.generate_extra_tensors for LongRoPE checkpoints (Phi-3-mini-128k, Phi-3.5-mini): the attention
    factor KV and the rope_factors_long / rope_factors_short tensors; None without rope long_factor. Factors must
    be rope_dims / 2 finite positive numbers each, the scaling type su / longrope (transformers' Phi3Config turns
    yarn into longrope, and so does the converter's AutoConfig load)."""
    where = f"{ckpt.path}: config.json"
    long_f, short_f = rope.get("long_factor"), rope.get("short_factor")
    if not long_f:
        return None
    orig = rope.get("original_max_position_embeddings")
    n_ctx = _first(cfg, ("n_positions", "max_position_embeddings"))
    if not _is_pos_int(orig) or not _is_pos_int(n_ctx):
        raise CheckpointError(f"{where} Phi-3 LongRoPE needs max_position_embeddings and "
                              "original_max_position_embeddings")
    rope_type = str(rope.get("rope_type") or "").lower()
    if rope_type not in ("su", "longrope", "yarn"):
        raise CheckpointError(f"{where} rope long_factor needs rope type longrope, got {_short(rope_type)}")
    rope_dims = int(rope.get("partial_rotary_factor", 1.0) * cfg["hidden_size"]) // cfg["num_attention_heads"]
    for key, f in (("long_factor", long_f), ("short_factor", short_f)):
        if not isinstance(f, list) or len(f) != rope_dims // 2 or rope_dims % 2 or not all(
                _is_number(x) and math.isfinite(float(x)) and float(x) > 0 for x in f):
            raise CheckpointError(f"{where} rope {key} must be {rope_dims // 2} finite positive numbers, got "
                                  f"{_short(f)}")
    scale = n_ctx / orig
    if scale > 1.0 and orig == 1:  # the converter divides by log(1)
        raise CheckpointError(f"{where} original_max_position_embeddings must exceed 1 for LongRoPE")
    attn_factor = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    return (attn_factor, _rope_factor_tensor("rope_factors_long.weight", long_f),
            _rope_factor_tensor("rope_factors_short.weight", short_f))


def _phi3_params(ckpt: Checkpoint, w: gguf.GGUFWriter, cfg: dict, rope: dict) -> int:
    """Phi3MiniModel.set_gguf_parameters (its own KV order); returns where general.file_type goes. LongRoPE
    checkpoints add a KV and two tensors (phi3_longrope)."""
    if rope.get("original_max_position_embeddings") is None:
        raise CheckpointError(f"{ckpt.path}: config.json lacks original_max_position_embeddings (Phi-3)")
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    w.add_context_length(_first(cfg, ("n_positions", "max_position_embeddings")))
    w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_dimension_count(int(rope.get("partial_rotary_factor", 1.0) * n_embd) // n_head)
    w.add_rope_freq_base(rope.get("full_attention", rope)["rope_theta"])
    file_type_index = len(w.kv_data[0])
    w.add_sliding_window(cfg.get("sliding_window") or 0)  # 0 tells Phi-3 from Phi-4 (no sliding window)
    return file_type_index


def _gemma2_params(ckpt: Checkpoint, w: gguf.GGUFWriter, cfg: dict, rope: dict) -> int:
    """Gemma2Model.set_gguf_parameters (its own KV order, soft-capping and sliding window); returns where
    general.file_type goes."""
    for k in ("intermediate_size", "head_dim", "sliding_window"):
        if cfg.get(k) is None:
            raise CheckpointError(f"{ckpt.path}: config.json lacks {k!r} (Gemma 2)")
    for k in ("attn_logit_softcapping", "final_logit_softcapping"):
        v = cfg.get(k)
        if not (_is_number(v) and math.isfinite(float(v)) and float(v) > 0):
            raise CheckpointError(f"{ckpt.path}: config.json {k} must be a finite positive number, got {_short(v)}")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    file_type_index = len(w.kv_data[0])
    w.add_attn_logit_softcapping(cfg["attn_logit_softcapping"])
    w.add_final_logit_softcapping(cfg["final_logit_softcapping"])
    w.add_sliding_window(cfg["sliding_window"])
    return file_type_index


def _no_duplicate_key_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Duplicated key name")


def _gemma3_params(ckpt: Checkpoint, w: gguf.GGUFWriter, cfg: dict, rope: dict) -> int:
    """Gemma3Model.set_gguf_parameters: TextModel's KVs, then its own values (a repeated key keeps its place, as
    GGUFWriter overwrites in place) and soft-capping / sliding window; returns where general.file_type goes."""
    if cfg.get("attn_logit_softcapping") is not None:
        raise CheckpointError(f"{ckpt.path}: Gemma 3 has no attn_logit_softcapping (the converter asserts so)")
    file_type_index = _text_params(ckpt, w, cfg, rope)
    logging.getLogger("gguf.gguf_writer").addFilter(_no_duplicate_key_warning)  # the overwrites are intended
    w.add_context_length(cfg.get("max_position_embeddings", 131072))
    w.add_head_count(cfg.get("num_attention_heads", 8))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_key_length(cfg.get("head_dim", 256))
    w.add_value_length(cfg.get("head_dim", 256))
    w.add_rope_freq_base(rope.get("full_attention", rope).get("rope_theta", 1_000_000.0))
    if final := cfg.get("final_logit_softcapping"):
        if not (_is_number(final) and math.isfinite(float(final)) and float(final) > 0):
            raise CheckpointError(f"{ckpt.path}: config.json final_logit_softcapping must be a finite positive "
                                  f"number, got {_short(final)}")
        w.add_final_logit_softcapping(final)
    if cfg.get("sliding_window_pattern") != 1:
        w.add_sliding_window(cfg["sliding_window"])
    w.add_head_count_kv(cfg.get("num_key_value_heads", 4))
    return file_type_index


def _vocab_rows(model_dir: Path, vocab_size: int | None) -> int:
    """Gemma3Model.modify_tensors' real vocabulary size: the SentencePiece table (padded to vocab_size), else the
    tokenizer.json vocabulary plus its added tokens."""
    if (model_dir / "tokenizer.model").is_file():
        return len(sentencepiece_vocab(model_dir, vocab_size)[0])
    try:
        tj = json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        return len(tj["model"]["vocab"]) + len(tj["added_tokens"])
    except (OSError, ValueError, KeyError, TypeError):
        raise CheckpointError(f"{model_dir}: Gemma 3 needs tokenizer.model or a tokenizer.json with a vocabulary"
                              ) from None


def _norm_plus_one(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    """Gemma's `data_torch + 1` as the converter computes it: in float16 for an F16 source (torch's half add:
    float32 sum rounded to half), in float32 otherwise (other dtypes are made float32 first)."""
    if dtype == "F16":
        return lambda a: (a + np.float32(1)).astype(np.float16).astype(np.float32)
    return lambda a: a + np.float32(1)


def _text_params(ckpt: Checkpoint, w: gguf.GGUFWriter, cfg: dict, rope: dict) -> int:
    """TextModel.set_gguf_parameters; returns where general.file_type goes (the pipeline adds it)."""
    w.add_block_count(cfg["num_hidden_layers"])
    if (n_ctx := _first(cfg, ("max_position_embeddings", "n_ctx", "n_positions", "max_length",
                              "max_sequence_length", "model_max_length"))) is not None:
        w.add_context_length(n_ctx)
    w.add_embedding_length(cfg["hidden_size"])
    if (n_ff := _first(cfg, ("prefix_dense_intermediate_size", "dense_intermediate_size", "intermediate_size",
                             "n_inner", "hidden_dim"))) is not None:
        w.add_feed_forward_length(n_ff)
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    if cfg.get("is_causal") is False:
        w.add_causal_attention(False)
    params = rope.get("full_attention", rope)
    rope_type, factor = params.get("rope_type"), params.get("factor")
    if rope_type == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif rope_type == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(params["original_max_position_embeddings"])
    elif rope_type in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if (theta := params.get("rope_theta")) is not None:
        w.add_rope_freq_base(theta)
    if (local_theta := rope.get("sliding_attention", {}).get("rope_theta")) is not None:
        w.add_rope_freq_base_swa(local_theta)
    if (eps := _first(cfg, ("rms_norm_eps", "norm_eps"))) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (eps := _first(cfg, ("layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"))) is not None:
        w.add_layer_norm_eps(eps)
    if (n_experts := _first(cfg, _N_EXPERT_KEYS)) is not None:
        w.add_expert_count(n_experts)
    if (n_used := _first(cfg, ("num_experts_per_tok", "num_experts_per_token", "top_k_experts"))) is not None:
        w.add_expert_used_count(n_used)
    if (n_group := cfg.get("n_group")) is not None:
        w.add_expert_group_count(n_group)
    if (n_group_used := cfg.get("topk_group")) is not None:
        w.add_expert_group_used_count(n_group_used)
    if (score := _first(cfg, _SCORE_FUNC_KEYS)) is not None:
        gating = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID, "softmax": gguf.ExpertGatingFuncType.SOFTMAX,
                  "sqrtsoftplus": gguf.ExpertGatingFuncType.SQRTSOFTPLUS}.get(score)
        if gating is None:
            raise CheckpointError(f"{ckpt.path}: config.json expert score function {_short(score)} is not supported")
        w.add_expert_gating_func(gating)
    if (head_dim := cfg.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    return len(w.kv_data[0])


_N_EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")
_SCORE_FUNC_KEYS = ("score_function", "scoring_func", "score_func", "moe_router_activation",
                    "moe_router_activation_func", "expert_selection_fn")
_HF_INT_KEYS = ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "vocab_size",
                "head_dim", "max_position_embeddings", "n_ctx", "n_positions", "max_length", "max_sequence_length",
                "model_max_length", "prefix_dense_intermediate_size", "dense_intermediate_size",
                "intermediate_size", "n_inner", "hidden_dim", "num_local_experts", "num_experts",
                "n_routed_experts", "num_experts_per_tok", "num_experts_per_token", "top_k_experts",
                "moe_intermediate_size", "shared_expert_intermediate_size", "n_group", "topk_group",
                "original_max_position_embeddings")
_HF_FLOAT_KEYS = ("attn_logit_softcapping", "final_logit_softcapping", "rope_theta", "global_rope_theta", "rope_global_theta", "rope_theta_global", "rotary_emb_base",
                  "rms_norm_eps", "norm_eps", "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon",
                  "partial_rotary_factor", "local_rope_theta", "rope_local_base_freq")
_ROPE_INT_KEYS = ("original_max_position_embeddings",)
_ROPE_FLOAT_KEYS = ("rope_theta", "factor", "low_freq_factor", "high_freq_factor", "partial_rotary_factor")


def _check_hf_config(ckpt: Checkpoint, cfg: dict) -> None:
    """Refuse hostile or inconsistent config.json values with one CheckpointError, before anything is allocated:
    sizes must be integers in [1, 2**31-1] (no bools, strings, floats, objects), rope/eps values finite and
    positive, heads must divide the hidden size and KV heads the heads, and block_count cannot exceed the number
    of tensors present (each block needs several)."""
    where = f"{ckpt.path}: config.json"
    for k in _HF_INT_KEYS:
        v = cfg.get(k)
        if v is not None and not _is_pos_int(v):
            raise CheckpointError(f"{where} {k} must be an integer between 1 and {MAX_HPARAM_INT}, got {_short(v)}")
    for k in _HF_FLOAT_KEYS:
        v = cfg.get(k)
        if v is not None and not (_is_number(v) and math.isfinite(float(v)) and float(v) > 0):
            raise CheckpointError(f"{where} {k} must be a finite positive number, got {_short(v)}")
    for k in ("rope_parameters", "rope_scaling"):
        rope = cfg.get(k)
        if rope is None:
            continue
        if not isinstance(rope, dict):
            raise CheckpointError(f"{where} {k} must be an object, got {_short(rope)}")
        for sub in [rope] + [v for v in rope.values() if isinstance(v, dict)]:
            for rk in _ROPE_INT_KEYS:
                if sub.get(rk) is not None and not _is_pos_int(sub[rk]):
                    raise CheckpointError(f"{where} {k}.{rk} must be a positive integer, got {_short(sub[rk])}")
            for rk in _ROPE_FLOAT_KEYS:
                v = sub.get(rk)
                if v is not None and not (_is_number(v) and math.isfinite(float(v)) and float(v) > 0):
                    raise CheckpointError(f"{where} {k}.{rk} must be a finite positive number, got {_short(v)}")
            for rk in ("rope_type", "type"):
                if sub.get(rk) is not None and not isinstance(sub[rk], str):
                    raise CheckpointError(f"{where} {k}.{rk} must be a string, got {_short(sub[rk])}")
    n_embd, n_head = cfg["hidden_size"], cfg["num_attention_heads"]
    n_kv = cfg.get("num_key_value_heads") or n_head
    if n_head % n_kv:
        raise CheckpointError(f"{where} num_attention_heads {n_head} is not a multiple of num_key_value_heads {n_kv}")
    if cfg.get("head_dim") is None and n_embd % n_head:
        raise CheckpointError(f"{where} hidden_size {n_embd} is not divisible by num_attention_heads {n_head}")
    if cfg["num_hidden_layers"] > len(ckpt.tensors):
        raise CheckpointError(f"{where} num_hidden_layers is {cfg['num_hidden_layers']} but the checkpoint has only "
                              f"{len(ckpt.tensors)} tensors")


def _plan_hf(ckpt: Checkpoint, spec: _HFArch, cfg: dict, tokenizer_pre: str | None) -> ModelPlan:
    raw_cfg = dict(cfg)  # the converter's tokenizer code sees config.json without our defaults
    for k, v in spec.defaults.items():
        cfg.setdefault(k, v)
    for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if k not in cfg:
            raise CheckpointError(f"{ckpt.path}: config.json lacks {k!r}")
    _check_hf_config(ckpt, cfg)
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if spec.fill_head_dim and cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]  # as transformers' LlamaConfig sets it
    n_layer, n_head, n_head_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = _rope_parameters(cfg)
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, n_layer)
    tensors: list[PlannedTensor] = []
    if spec.llama_extras and (rf := _llama3_rope_freqs(cfg, rope)) is not None:
        tensors.append(PlannedTensor(rf.name, rf.shape, rf))
    if spec.params == "phi3" and (lr := phi3_longrope(ckpt, cfg, rope)) is not None:
        tensors += [PlannedTensor(f.name, f.shape, f) for f in lr[1:]]
    mapped: dict[str, str] = {}
    for name, t, transform in _converter_tensors(ckpt, spec, cfg):
        new_name = name_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise CheckpointError(
                f"cannot map tensor {t.name!r} to a GGUF name for architecture "
                f"{gguf.MODEL_ARCH_NAMES[spec.gguf_arch]!r}; use --generic to keep the original names")
        if new_name in mapped:
            raise CheckpointError(f"{ckpt.path}: tensors {mapped[new_name]!r} and {t.name!r} both map to GGUF "
                                  f"tensor {new_name!r}; refused (one would be silently dropped)")
        mapped[new_name] = t.name
        tensors.append(PlannedTensor(new_name, t.shape, t, transform))
    kvs, file_type_index = _hf_kvs(ckpt, spec, cfg, rope, _parameter_counts(tensors))
    model_dir = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    tok = tokenizer_kvs(model_dir, gguf.MODEL_ARCH_NAMES[spec.gguf_arch], raw_cfg, tokenizer_pre=tokenizer_pre)
    kvs += tok.kv
    arch_name = gguf.MODEL_ARCH_NAMES[spec.gguf_arch]
    problems = check_architecture(arch_name, {kv.key: kv.value for kv in kvs}, {t.name: t.shape for t in tensors})
    if problems:
        raise CheckpointError(f"{ckpt.path}: config.json and the tensors present disagree: "
                              + "; ".join(problems[:3]) + (f" (+{len(problems) - 3} more)" if len(problems) > 3 else ""))
    hparams = {
        "n_layer": int(n_layer), "n_embd": int(cfg["hidden_size"]), "n_head": int(n_head),
        "n_head_kv": int(n_head_kv), "n_ff": int(cfg.get("intermediate_size") or 0),
        "n_vocab": int(cfg["vocab_size"]), "n_expert": int(_first(cfg, _N_EXPERT_KEYS) or 0),
    }
    return ModelPlan(arch=gguf.MODEL_ARCH_NAMES[spec.gguf_arch], kv=kvs, tensors=tensors, hparams=hparams,
                     source_kind=ckpt.kind, file_type_index=file_type_index, tokenizer=tok)


def _plan_generic(ckpt: Checkpoint) -> ModelPlan:
    if not ckpt.tensors:
        raise CheckpointError(f"{ckpt.path}: the checkpoint has no tensors; nothing to quantize")
    tensors = []
    for t in ckpt.tensors:
        if len(t.name.encode("utf-8")) > MAX_TENSOR_NAME_BYTES:
            raise CheckpointError(
                f"tensor name {t.name!r} is {len(t.name.encode('utf-8'))} bytes; GGUF names must be under 64 bytes")
        tensors.append(PlannedTensor(t.name, t.shape, t))
    kvs = [KV("general.architecture", GENERIC_ARCH, GGUFValueType.STRING),
           KV("general.type", "model", GGUFValueType.STRING),
           KV("general.name", (ckpt.path if ckpt.path.is_dir() else ckpt.path.parent).name or "model",
              GGUFValueType.STRING)]
    n_layer = 0
    for t in ckpt.tensors:
        parts = t.name.split(".")
        nums = [int(p) for p in parts if p.isdecimal()]
        if nums:
            n_layer = max(n_layer, nums[0] + 1)
    hparams = {"n_layer": n_layer, "n_embd": 0, "n_head": 0, "n_head_kv": 0, "n_ff": 0, "n_vocab": 0, "n_expert": 0}
    return ModelPlan(arch=GENERIC_ARCH, kv=kvs, tensors=tensors, hparams=hparams, source_kind=ckpt.kind)


def plan_model(ckpt: Checkpoint, *, generic: bool = False, tokenizer_pre: str | None = None) -> ModelPlan:
    """Plan the output GGUF's tensors and KVs for a checkpoint: GGUF sources carry over unchanged; HF llama-family
    folders get convert_hf_to_gguf's names, permutation, KVs and tokenizer (`tokenizer_pre` overrides the BPE
    pre-tokenizer name); others need `generic=True` (names kept as-is)."""
    if ckpt.kind == "gguf":
        return _plan_gguf(ckpt)
    if generic:
        return _plan_generic(ckpt)
    cfg = _hf_config(ckpt)
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"{ckpt.path}: config.json 'architectures' must be a list of strings, got {_short(archs)}")
    hf_arch = archs[0] if archs else None
    spec = _HF_ARCHS.get(hf_arch) if hf_arch else None
    if spec is None:
        what = f"architecture {hf_arch!r}" if hf_arch else "an unknown architecture (no config.json 'architectures')"
        raise CheckpointError(
            f"{ckpt.path}: {what} is not supported (supported: {', '.join(sorted(_HF_ARCHS))}); "
            "use --generic to keep the original tensor names")
    return _plan_hf(ckpt, spec, cfg, tokenizer_pre)
