"""Layer-streamed forward passes equal transformers' full forward: the bundled Llama, a tiny Qwen2 (tied head,
q/k/v biases) and a tiny Mistral as HF folders, and GGUFs of them (F16 and quantized, dequantized per tensor)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from runtime.layer_stream import LayerStream, group_by_budget, stream_logits, supports

ROOT = Path(__file__).resolve().parents[2]
SEQS = [[1, 5, 9, 200, 17, 3, 44, 81, 12], [1, 7], [1, 300, 301, 302, 11, 9, 250, 4, 4, 4, 8, 100, 101, 6]]


def _full_logits(path: Path, seqs) -> list[np.ndarray]:
    import torch

    from runtime.backends.torch_backend import load_torch_model

    model = load_torch_model(path)
    with torch.inference_mode():
        return [model(input_ids=torch.tensor([s]), use_cache=False).logits[0].float().numpy() for s in seqs]


def _streamed(path: Path, seqs, **kw) -> list[np.ndarray]:
    got: dict[int, np.ndarray] = {}
    n_vocab = stream_logits(path, seqs, lambda i, lg: got.__setitem__(i, lg), **kw)
    assert sorted(got) == list(range(len(seqs))) and all(g.shape == (len(s), n_vocab) for g, s in zip(got.values(), seqs))
    return [got[i] for i in range(len(seqs))]


def _close(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-5) -> None:
    for x, y in zip(a, b):
        assert x.shape == y.shape
        assert np.max(np.abs(x - y)) <= tol * max(1.0, float(np.max(np.abs(y)))), np.max(np.abs(x - y))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    from quantgate.convert import convert_model
    from tests.quantgate.tiny_hf import make_tiny_model
    from tests.validation._tiny import quantize_to

    d = tmp_path_factory.mktemp("stream")
    out = {"qwen2": make_tiny_model(d / "qwen2", "qwen2", seed=1), "mistral": make_tiny_model(d / "mistral", "mistral")}
    convert_model(out["qwen2"], d / "qwen2-f16.gguf", "f16")
    out["qwen2-f16.gguf"] = d / "qwen2-f16.gguf"
    out["qwen2-q4.gguf"] = quantize_to(d / "qwen2-f16.gguf", d / "qwen2-q4.gguf", "Q4_K_M")
    convert_model(ROOT / "models/reference", d / "ref-f16.gguf", "f16")
    out["ref-f16.gguf"] = d / "ref-f16.gguf"
    out["ref-q4.gguf"] = quantize_to(ROOT / "models/reference", d / "ref-q4.gguf", "Q4_K_M")
    return out


def test_bundled_llama_logits_equal_the_full_forward():
    path = ROOT / "models/reference"
    assert supports(path)
    _close(_streamed(path, SEQS), _full_logits(path, SEQS), tol=1e-6)


@pytest.mark.parametrize("which", ["qwen2", "mistral", "qwen2-f16.gguf", "qwen2-q4.gguf", "ref-f16.gguf", "ref-q4.gguf"])
def test_tiny_models_and_ggufs_equal_the_full_forward(tiny, which):
    seqs = [[t % 500 for t in s] for s in SEQS]
    _close(_streamed(tiny[which], seqs), _full_logits(tiny[which], seqs))


def test_several_sweeps_give_the_same_logits(tiny):
    seqs = [[t % 500 for t in s] for s in SEQS]
    assert group_by_budget([len(s) for s in seqs], 256, 1) == [[0], [1], [2]]  # one sequence per sweep
    _close(_streamed(tiny["qwen2"], seqs, activation_budget=1), _streamed(tiny["qwen2"], seqs), tol=0.0)


def test_one_block_in_memory_at_a_time(tiny):
    """Only the block being run holds real weights; the others stay on the meta device."""
    with LayerStream(tiny["qwen2"]) as ls:
        with ls.block(1) as layer:
            assert all(not p.is_meta for p in layer.parameters())
            assert all(p.is_meta for i, blk in enumerate(ls.decoder.layers) if i != 1 for p in blk.parameters())
        assert all(p.is_meta for p in ls.skeleton.parameters())


def test_unknown_architecture_is_not_streamed(tmp_path):
    cfg = json.loads((ROOT / "models/reference/config.json").read_text())
    cfg["model_type"] = "made_up_arch"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    (tmp_path / "model.safetensors").write_bytes((ROOT / "models/reference/model.safetensors").read_bytes())
    assert not supports(tmp_path)
