"""Layer-streamed logits equal transformers' full forward for every ARCHS row beyond Llama/Qwen2/Mistral: tiny
random Qwen3, Phi-3, Gemma 2, Gemma 3 (text) and the MoE families (Mixtral, Qwen2-MoE with its shared expert,
Qwen3-MoE), from the HF folder and from our F16 GGUF of it. Gemma's sliding window is shrunk to 4 tokens and
Gemma 3 has 6 layers (5 local + 1 global, llama.cpp's pattern) so the per-layer masks and rope thetas matter."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from runtime.layer_stream import ARCHS, LayerStream, model_type_of, supports
from tests.runtime.test_layer_stream import SEQS, _close, _full_logits, _streamed

#: tiny_hf arch -> (HF model_type, layers)
TINY = {"qwen3": ("qwen3", 2), "phi3": ("phi3", 2), "gemma2": ("gemma2", 2), "gemma3": ("gemma3_text", 6),
        "mixtral": ("mixtral", 2), "qwen2moe": ("qwen2_moe", 2), "qwen3moe": ("qwen3_moe", 2)}


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    from quantgate.convert import convert_model
    from tests.quantgate.tiny_hf import make_tiny_model

    d = tmp_path_factory.mktemp("stream-archs")
    out: dict[str, Path] = {}
    for arch, (_, n_layer) in TINY.items():
        folder = make_tiny_model(d / arch, arch, seed=3, n_layer=n_layer, init=0.2)
        if arch.startswith("gemma"):  # a window shorter than the sequences, so sliding layers differ from full ones
            cfg = json.loads((folder / "config.json").read_text())
            cfg["sliding_window"] = 4
            (folder / "config.json").write_text(json.dumps(cfg))
        out[arch] = folder
        convert_model(folder, d / f"{arch}-f16.gguf", "f16")
        out[f"{arch}.gguf"] = d / f"{arch}-f16.gguf"
    return out


@pytest.mark.parametrize("source", ["hf", "gguf"])
@pytest.mark.parametrize("arch", list(TINY))
def test_streamed_logits_equal_the_full_forward(models, arch, source):
    path = models[arch if source == "hf" else f"{arch}.gguf"]
    assert model_type_of(path) == TINY[arch][0] and supports(path)
    seqs = [[t % 500 for t in s] for s in SEQS]
    _close(_streamed(path, seqs), _full_logits(path, seqs))


def test_gemma_fixtures_exercise_windows_and_layer_types(models):
    """The Gemma rows' extra fields are in play: a 4-token window, both attention types, a soft-cap."""
    for arch in ("gemma2", "gemma3"):
        with LayerStream(models[f"{arch}.gguf"]) as ls:
            assert ls.config.sliding_window == 4
            assert set(ls.layer_types) == {"sliding_attention", "full_attention"}
            assert ls.arch.embed_scale and (ls.softcap is not None) == (arch == "gemma2")
    assert ARCHS["gemma3_text"].rotary_per_layer_type


def test_moe_blocks_hold_fused_experts(models):
    """A streamed MoE block holds transformers' fused (n_expert, rows, cols) experts, gathered from the per-expert
    weights of the folder and from the GGUF's stacked tensors alike."""
    for arch, n in (("mixtral", 8), ("qwen2moe", 4)):
        for src in (arch, f"{arch}.gguf"):
            with LayerStream(models[src]) as ls, ls.block(1) as layer:
                assert ls.n_experts == n
                assert tuple(layer.mlp.experts.gate_up_proj.shape) == (n, 2 * 256, 256)
                assert tuple(layer.mlp.experts.down_proj.shape) == (n, 256, 256)
