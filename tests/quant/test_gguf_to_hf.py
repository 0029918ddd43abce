"""GGUF -> HF: model_plan then gguf_to_hf gives back the original config and tensors (Q/K permutation undone)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file

from quant.gguf_reader import read_gguf
from quant.gguf_to_hf import gguf_to_hf, hf_config_from_gguf, unpermute_qk
from quant.model_plan import permute_qk
from tests.validation._tiny import quantize_to, tiny_model  # noqa: F401  (fixture)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 3), st.booleans())
def test_unpermute_inverts_permute(n_head_kv, group, half_dim, cols, bias):
    n_head = n_head_kv * group
    rows = n_head_kv * 2 * half_dim
    shape = (rows,) if bias else (rows, cols)
    w = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
    for heads_kv in (n_head_kv, None):
        p = permute_qk(w, n_head if heads_kv else n_head_kv, heads_kv)
        assert np.array_equal(unpermute_qk(p, n_head if heads_kv else n_head_kv, heads_kv), w)


@pytest.fixture(scope="module")
def f16_gguf(tiny_model, tmp_path_factory):  # noqa: F811
    return quantize_to(tiny_model, tmp_path_factory.mktemp("g2h") / "tiny-f16.gguf", "F16")


def test_round_trip_tensors_exact(tiny_model, f16_gguf):  # noqa: F811
    original = load_file(str(tiny_model / "model.safetensors"))
    cfg, sd = gguf_to_hf(f16_gguf)
    assert set(sd) == set(original)
    for name, arr in original.items():
        assert np.array_equal(sd[name], arr.astype(np.float32)), name
    # the permutation really happened in the GGUF (so the test would catch a missing inverse)
    with read_gguf(f16_gguf) as g:
        q = g.tensor_data("blk.0.attn_q.weight").view(np.float16).reshape(256, 256)
        assert not np.array_equal(q, original["model.layers.0.self_attn.q_proj.weight"])


def test_round_trip_config(tiny_model, f16_gguf):  # noqa: F811
    import json

    src = json.loads((tiny_model / "config.json").read_text())
    with read_gguf(f16_gguf) as g:
        cfg = hf_config_from_gguf(g)
    for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings", "head_dim"):
        assert cfg[k] == src[k], k
    assert cfg["rms_norm_eps"] == pytest.approx(src["rms_norm_eps"])
    assert cfg["rope_parameters"]["rope_theta"] == pytest.approx(src["rope_parameters"]["rope_theta"])
    assert cfg["architectures"] == ["LlamaForCausalLM"]


def test_quantized_tensors_are_dequantized(tiny_model, tmp_path):  # noqa: F811
    import quant

    q = quantize_to(tiny_model, tmp_path / "q8.gguf", "Q8_0")
    _, sd = gguf_to_hf(q)
    with read_gguf(q) as g:
        t = g.tensor("blk.1.ffn_up.weight")
        expect = quant.dequantize(g.tensor_data(t), t.qtype, t.shape)
    assert t.qtype == "Q8_0"
    assert np.array_equal(sd["model.layers.1.mlp.up_proj.weight"], expect)


def test_reading_tensor_by_tensor_keeps_about_one_tensor_of_the_file_resident(tmp_path):
    """read_tensor_f32 (the layer-streamed runtime's and the tensor-error check's reader) drops each tensor's mapped
    pages once copied out: without it, every page read stays in RSS (an 8B F16 GGUF: +0.44 GB a block)."""
    from quant.gguf_reader import read_gguf
    from quant.gguf_to_hf import read_tensor_f32
    from quant.gguf_writer import TensorSpec, write_gguf
    from tests.quant.loaders.test_resident import _MB, _mapped_rss, _tensors

    want = _tensors()  # 6 F16 tensors of 1 MiB
    path = tmp_path / "m.gguf"
    write_gguf(path, kv=[], tensors=[TensorSpec(k, v.shape, "F16", (lambda v=v: v.reshape(-1).view(np.uint8)))
                                     for k, v in want.items()])
    with read_gguf(path) as g:
        for _ in range(2):  # dropped, not lost: the second read faults the pages back in from the file
            for t in g.tensors:
                np.testing.assert_array_equal(read_tensor_f32(g, t), want[t.name].astype(np.float32))
            assert _mapped_rss(path.resolve()) < 2 * _MB / 8
