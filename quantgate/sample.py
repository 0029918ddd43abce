"""Deterministic llama-shaped sample checkpoints (HF safetensors folders) for demos, tests and benchmarks."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.atomic import atomic_write_text


@dataclass(frozen=True)
class SampleShape:
    """Hyperparameters of a generated llama-architecture checkpoint."""

    n_layer: int = 2
    n_embd: int = 256
    n_ff: int = 768
    n_head: int = 8
    n_head_kv: int = 2
    n_vocab: int = 1024
    max_position_embeddings: int = 2048
    tie_embeddings: bool = False


#: A ~1.1B-parameter shape (TinyLlama's) for the streaming-memory benchmark.
SHAPE_1B = SampleShape(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000)


def _hf_config(s: SampleShape, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": s.n_embd,
        "intermediate_size": s.n_ff,
        "num_hidden_layers": s.n_layer,
        "num_attention_heads": s.n_head,
        "num_key_value_heads": s.n_head_kv,
        "vocab_size": s.n_vocab,
        "max_position_embeddings": s.max_position_embeddings,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": s.tie_embeddings,
        "torch_dtype": dtype,
        "bos_token_id": 1,
        "eos_token_id": 2,
    }


def _tensor_shapes(s: SampleShape) -> list[tuple[str, tuple[int, ...]]]:
    hd = s.n_embd // s.n_head
    out = [("model.embed_tokens.weight", (s.n_vocab, s.n_embd))]
    for i in range(s.n_layer):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (s.n_embd,)),
            (p + "self_attn.q_proj.weight", (s.n_embd, s.n_embd)),
            (p + "self_attn.k_proj.weight", (s.n_head_kv * hd, s.n_embd)),
            (p + "self_attn.v_proj.weight", (s.n_head_kv * hd, s.n_embd)),
            (p + "self_attn.o_proj.weight", (s.n_embd, s.n_embd)),
            (p + "post_attention_layernorm.weight", (s.n_embd,)),
            (p + "mlp.gate_proj.weight", (s.n_ff, s.n_embd)),
            (p + "mlp.up_proj.weight", (s.n_ff, s.n_embd)),
            (p + "mlp.down_proj.weight", (s.n_embd, s.n_ff)),
        ]
    out.append(("model.norm.weight", (s.n_embd,)))
    if not s.tie_embeddings:
        out.append(("lm_head.weight", (s.n_vocab, s.n_embd)))
    return out


def _weights(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    if len(shape) == 1:
        return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    # Student-t rows with per-row scales: heavy tails and outlier columns like trained LLM weights.
    fan_in = shape[-1]
    w = rng.standard_t(5, size=shape).astype(np.float32) / np.float32(np.sqrt(fan_in))
    w *= rng.lognormal(0.0, 0.3, size=(shape[0], 1)).astype(np.float32)
    hot = rng.choice(fan_in, size=max(1, fan_in // 128), replace=False)
    w[:, hot] *= 4.0
    return w


def make_sample_checkpoint(
    out_dir: str | Path,
    shape: SampleShape = SampleShape(),
    *,
    seed: int = 0,
    dtype: str = "float16",
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Write a deterministic llama-shaped HF folder (config.json + safetensors, sharded above max_shard_bytes)."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float16": np.float16, "float32": np.float32}[dtype]
    rng = np.random.default_rng(seed)
    shapes = _tensor_shapes(shape)
    itemsize = np.dtype(np_dtype).itemsize
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in shapes:
        nb = int(np.prod(shp)) * itemsize
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nb
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _weights(name, shp, rng).astype(np_dtype) for name, shp in group}
        tmp = out / f".{fname}.tmp"
        save_file(tensors, str(tmp), metadata={"format": "pt"})
        tmp.replace(out / fname)
        for name, arr in tensors.items():
            weight_map[name] = fname
            total += arr.nbytes
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    atomic_write_text(out / "config.json", json.dumps(_hf_config(shape, dtype), indent=2))
    atomic_write_text(out / "quantgate_sample.json", json.dumps({"seed": seed, **asdict(shape)}, indent=2))
    return out
