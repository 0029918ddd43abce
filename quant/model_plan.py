"""What the output GGUF contains independent of quantization: architecture, metadata KVs and the tensor list.

For HF sources this follows the pinned llama.cpp convert_hf_to_gguf.py (LlamaModel / Qwen2Model): tensor names
through gguf.TensorNameMap, the Q/K RoPE permutation, llama3 rope_freqs, and the hyperparameter KVs in the order
the converter adds them, followed by the tokenizer KVs (quant.tokenizer_gguf) so the GGUF runs in llama.cpp.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import gguf
import numpy as np
from gguf.constants import GGUFValueType

from core.errors import CheckpointError
from quant.gguf_kv import KV
from quant.loaders.base import Checkpoint, SourceTensor
from quant.tokenizer_gguf import TokenizerExport, kv_from_writer, tokenizer_kvs

GENERIC_ARCH = "quantgate-generic"
MAX_TENSOR_NAME_BYTES = 63  # GGML_MAX_NAME is 64 including the terminating NUL
_PIPELINE_KEYS = ("general.file_type", "general.quantization_version")
_SKIP_SUFFIXES = (".attention.masked_bias", ".attention.bias", ".rotary_emb.inv_freq")


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
class _HFArch:
    gguf_arch: gguf.MODEL_ARCH
    permute_qk: bool
    llama_extras: bool  # vocab_size + rope_dimension_count KVs and llama3 rope_freqs (LlamaModel only)
    defaults: dict[str, Any]


_LLAMA_DEFAULTS = {"vocab_size": 32000, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0}
_HF_ARCHS: dict[str, _HFArch] = {
    "LlamaForCausalLM": _HFArch(gguf.MODEL_ARCH.LLAMA, True, True, _LLAMA_DEFAULTS),
    "LLaMAForCausalLM": _HFArch(gguf.MODEL_ARCH.LLAMA, True, True, _LLAMA_DEFAULTS),
    "MistralForCausalLM": _HFArch(gguf.MODEL_ARCH.LLAMA, True, True,
                                  {**_LLAMA_DEFAULTS, "max_position_embeddings": 4096 * 32}),
    "Qwen2ForCausalLM": _HFArch(gguf.MODEL_ARCH.QWEN2, False, False,
                                {"vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6,
                                 "rope_theta": 10000.0}),
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


def _plan_gguf(ckpt: Checkpoint) -> ModelPlan:
    arch = ckpt.architecture
    if not arch:
        raise CheckpointError(f"{ckpt.path}: GGUF file has no general.architecture")
    kvs = [kv for kv in ckpt.gguf_kv if kv.key not in _PIPELINE_KEYS and not kv.key.startswith("quantgate.")]
    tensors = [PlannedTensor(t.name, t.shape, t) for t in ckpt.tensors]
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
        if "rope_type" not in rope and rope.get("type") is not None:
            rope["rope_type"] = rope["type"]
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


def _hf_kvs(ckpt: Checkpoint, spec: _HFArch, cfg: dict, rope: dict, n_params: int) -> tuple[list[KV], int]:
    arch_name = gguf.MODEL_ARCH_NAMES[spec.gguf_arch]
    w = gguf.GGUFWriter(path=None, arch=arch_name)
    w.add_type(gguf.GGUFType.MODEL)
    model_dir = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    meta = gguf.Metadata.load(None, model_dir, None, n_params)
    if meta.name is None:
        meta.name = model_dir.name
    if meta.size_label is None and n_params > 0:
        meta.size_label = gguf.size_label(n_params, n_params, 0, 0)
    meta.set_gguf_meta_model(w)
    # TextModel.set_gguf_parameters
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
    if (eps := _first(cfg, ("rms_norm_eps", "norm_eps"))) is not None:
        w.add_layer_norm_rms_eps(eps)
    if (head_dim := cfg.get("head_dim")) is not None:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    # (convert_hf_to_gguf adds general.file_type here; the pipeline adds it)
    file_type_index = len(w.kv_data[0])
    if spec.llama_extras:
        w.add_vocab_size(cfg["vocab_size"])
        w.add_rope_dimension_count(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    kvs = [kv_from_writer(k, v) for k, v in w.kv_data[0].items() if k not in _PIPELINE_KEYS]
    return kvs, file_type_index


def _plan_hf(ckpt: Checkpoint, spec: _HFArch, cfg: dict, tokenizer_pre: str | None) -> ModelPlan:
    raw_cfg = dict(cfg)  # the converter's tokenizer code sees config.json without our defaults
    for k, v in spec.defaults.items():
        cfg.setdefault(k, v)
    for k in ("num_hidden_layers", "hidden_size", "num_attention_heads"):
        if k not in cfg:
            raise CheckpointError(f"{ckpt.path}: config.json lacks {k!r}")
    if cfg.get("num_key_value_heads") is None:
        cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if spec.gguf_arch == gguf.MODEL_ARCH.LLAMA and cfg.get("head_dim") is None:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]  # as transformers' LlamaConfig sets it
    n_layer, n_head, n_head_kv = cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    rope = _rope_parameters(cfg)
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, n_layer)
    tensors: list[PlannedTensor] = []
    if spec.llama_extras and (rf := _llama3_rope_freqs(cfg, rope)) is not None:
        tensors.append(PlannedTensor(rf.name, rf.shape, rf))
    for t in ckpt.tensors:
        name = t.name.replace("language_model.", "")
        if name.endswith(_SKIP_SUFFIXES):
            continue
        new_name = name_map.get_name(key=name, try_suffixes=(".weight", ".bias"))
        if new_name is None:
            raise CheckpointError(
                f"cannot map tensor {t.name!r} to a GGUF name for architecture "
                f"{gguf.MODEL_ARCH_NAMES[spec.gguf_arch]!r}; use --generic to keep the original names")
        transform = None
        if spec.permute_qk and name.endswith(("q_proj.weight", "q_proj.bias")):
            transform = lambda a, h=n_head: permute_qk(a, h, h)  # noqa: E731
        elif spec.permute_qk and name.endswith(("k_proj.weight", "k_proj.bias")):
            transform = lambda a, h=n_head, hk=n_head_kv: permute_qk(a, h, hk)  # noqa: E731
        tensors.append(PlannedTensor(new_name, t.shape, t, transform))
    n_params = sum(int(np.prod(p.shape, dtype=np.int64)) for p in tensors)
    kvs, file_type_index = _hf_kvs(ckpt, spec, cfg, rope, n_params)
    model_dir = ckpt.path if ckpt.path.is_dir() else ckpt.path.parent
    tok = tokenizer_kvs(model_dir, gguf.MODEL_ARCH_NAMES[spec.gguf_arch], raw_cfg, tokenizer_pre=tokenizer_pre)
    kvs += tok.kv
    hparams = {
        "n_layer": int(n_layer), "n_embd": int(cfg["hidden_size"]), "n_head": int(n_head),
        "n_head_kv": int(n_head_kv), "n_ff": int(cfg.get("intermediate_size") or 0),
        "n_vocab": int(cfg["vocab_size"]), "n_expert": int(cfg.get("num_local_experts") or 0),
    }
    return ModelPlan(arch=gguf.MODEL_ARCH_NAMES[spec.gguf_arch], kv=kvs, tensors=tensors, hparams=hparams,
                     source_kind=ckpt.kind, file_type_index=file_type_index, tokenizer=tok)


def _plan_generic(ckpt: Checkpoint) -> ModelPlan:
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
    hf_arch = archs[0] if archs else None
    spec = _HF_ARCHS.get(hf_arch) if hf_arch else None
    if spec is None:
        what = f"architecture {hf_arch!r}" if hf_arch else "an unknown architecture (no config.json 'architectures')"
        raise CheckpointError(
            f"{ckpt.path}: {what} is not supported (supported: {', '.join(sorted(_HF_ARCHS))}); "
            "use --generic to keep the original tensor names")
    return _plan_hf(ckpt, spec, cfg, tokenizer_pre)
