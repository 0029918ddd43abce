"""Deterministic llama-shaped sample checkpoints (HF safetensors folders) for demos, tests and benchmarks."""
from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from core.atomic import atomic_write, atomic_write_text


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
    #: "t5": heavy-tailed Student-t(5) rows (like trained LLM weights; ~60 ns a value to draw), "normal": float32
    #: Gaussian rows (~6x faster: what makes a 16 GB 8B-shaped checkpoint a matter of minutes), both with the
    #: same per-row scales and outlier columns.
    values: str = "t5"


#: A ~1.1B-parameter shape (TinyLlama's) for the streaming-memory benchmark.
SHAPE_1B = SampleShape(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4, n_vocab=32000)
#: Llama-3-8B's shapes (8.03B parameters, ~16 GB in F16) for the at-scale benchmark (benchmarks/bench_scale.py).
SHAPE_8B = SampleShape(n_layer=32, n_embd=4096, n_ff=14336, n_head=32, n_head_kv=8, n_vocab=128256,
                       max_position_embeddings=8192, values="normal")
#: Named shapes for `quantgate sample --shape`.
SHAPES = {"1b": SHAPE_1B, "8b": SHAPE_8B}
#: Tensors with more elements than this are generated in row blocks (bounded memory); smaller ones in one draw, so
#: the values of every shape whose tensors are all below it stay what they always were for a given seed.
_CHUNKED_ABOVE = 1 << 27
_CHUNK_ELEMENTS = 1 << 24


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


def _weight_blocks(name: str, shape: tuple[int, ...], rng: np.random.Generator,
                   values: str = "t5") -> Iterator[np.ndarray]:
    """The tensor's float32 values in row blocks: t5 tensors up to _CHUNKED_ABOVE elements in one block
    (`_weights`), larger ones and every "normal" matrix block by block (row scales and hot columns first),
    never the whole tensor."""
    n = int(np.prod(shape))
    if len(shape) != 2 or (values == "t5" and n <= _CHUNKED_ABOVE):
        yield _weights(name, shape, rng)
        return
    rows, fan_in = shape
    scales = rng.lognormal(0.0, 0.3, size=(rows, 1)).astype(np.float32)
    hot = rng.choice(fan_in, size=max(1, fan_in // 128), replace=False)
    step = max(1, _CHUNK_ELEMENTS // fan_in)
    for r in range(0, rows, step):
        size = (min(step, rows - r), fan_in)
        if values == "normal":
            w = rng.standard_normal(size, dtype=np.float32) * np.float32(1.0 / np.sqrt(fan_in))
        else:
            w = rng.standard_t(5, size=size).astype(np.float32) / np.float32(np.sqrt(fan_in))
        w *= scales[r:r + step]
        w[:, hot] *= 4.0
        yield w


def _write_safetensors(path: Path, group: list[tuple[str, tuple[int, ...]]], np_dtype: type,
                       rng: np.random.Generator, values: str) -> None:
    """Write one safetensors file tensor by tensor (header first: the offsets follow from the shapes), atomically."""
    st_dtype = {np.float16: "F16", np.float32: "F32"}[np_dtype]
    itemsize = np.dtype(np_dtype).itemsize
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shp in group:
        nb = int(np.prod(shp)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shp), "data_offsets": [off, off + nb]}
        off += nb
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # safetensors pads the header to 8 bytes
    with atomic_write(path) as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, shp in group:
            for block in _weight_blocks(name, shp, rng, values):
                f.write(block.astype(np_dtype).reshape(-1).view(np.uint8))


def make_sample_checkpoint(
    out_dir: str | Path,
    shape: SampleShape = SampleShape(),
    *,
    seed: int = 0,
    dtype: str = "float16",
    max_shard_bytes: int = 2 << 30,
) -> Path:
    """Write a deterministic llama-shaped HF folder (config.json + safetensors, sharded above max_shard_bytes),
    streaming: one tensor (row blocks for the largest) in memory at a time, whatever the shape."""
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
        _write_safetensors(out / fname, group, np_dtype, rng, shape.values)
        for name, shp in group:
            weight_map[name] = fname
            total += int(np.prod(shp)) * itemsize
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        atomic_write_text(out / "model.safetensors.index.json", json.dumps(index, indent=2))
    atomic_write_text(out / "config.json", json.dumps(_hf_config(shape, dtype), indent=2))
    atomic_write_text(out / "quantgate_sample.json", json.dumps({"seed": seed, **asdict(shape)}, indent=2))
    return out
