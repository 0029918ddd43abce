"""quant.mixes: llama.cpp's per-tensor type choice, proven against llama.cpp's own quantizer (llama_model_quantize)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf.constants import GGMLQuantizationType

from core.errors import CheckpointError, UnsupportedTypeError
from quant.loaders.base import Checkpoint, SourceTensor
from quant.mixes import LOWBIT_FTYPES, PRECISIONS, get_mix, llama_quantize_order, tensor_types
from quant.model_plan import ModelPlan, PlannedTensor, plan_model


def _shapes(n_layer: int, n_embd: int, n_ff: int, n_head: int, n_head_kv: int, vocab: int, tied: bool):
    hd = n_embd // n_head
    out = [("token_embd.weight", (vocab, n_embd)), ("output_norm.weight", (n_embd,))]
    if not tied:
        out.append(("output.weight", (vocab, n_embd)))
    for i in range(n_layer):
        out += [(f"blk.{i}.attn_norm.weight", (n_embd,)), (f"blk.{i}.attn_q.weight", (n_embd, n_embd)),
                (f"blk.{i}.attn_k.weight", (hd * n_head_kv, n_embd)),
                (f"blk.{i}.attn_v.weight", (hd * n_head_kv, n_embd)),
                (f"blk.{i}.attn_output.weight", (n_embd, n_embd)), (f"blk.{i}.ffn_norm.weight", (n_embd,)),
                (f"blk.{i}.ffn_gate.weight", (n_ff, n_embd)), (f"blk.{i}.ffn_up.weight", (n_ff, n_embd)),
                (f"blk.{i}.ffn_down.weight", (n_embd, n_ff))]
    return out


# (n_layer, n_embd, n_ff, n_head, n_head_kv, vocab, tied embeddings)
CONFIGS = {
    "l4_ff640": (4, 256, 640, 8, 2, 512, False),     # ffn_down rows of 640: K-quants fall back to 32-block types
    "l8_tied": (8, 256, 768, 8, 2, 512, True),       # use_more_bits pattern over 8 layers; tied token_embd
    "l4_e320_ff600": (4, 320, 600, 8, 8, 256, False),  # n_embd 320 (output -> Q8_0); 600 % 32 != 0 -> F16; no GQA
    "l16": (16, 256, 512, 4, 2, 256, False),          # n_layer / 16 == 1: Q3_K_M's first-layer ffn_down rule
}


def _write_gguf(path: Path, cfg) -> None:
    n_layer, n_embd, n_ff, n_head, n_head_kv, vocab, tied = cfg
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(n_layer)
    w.add_context_length(128)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_rope_dimension_count(n_embd // n_head)
    w.add_file_type(1)
    rng = np.random.default_rng(0)
    for name, shape in _shapes(n_layer, n_embd, n_ff, n_head, n_head_kv, vocab, tied):
        w.add_tensor(name, rng.standard_normal(shape).astype(np.float32 if len(shape) == 1 else np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _plan(cfg) -> ModelPlan:
    n_layer, n_embd, n_ff, n_head, n_head_kv, vocab, tied = cfg

    def reader():
        raise AssertionError("type choice must not read data")

    tensors = [PlannedTensor(n, s, SourceTensor(n, s, "F32" if len(s) == 1 else "F16", reader))
               for n, s in _shapes(*cfg)]
    hp = {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_head_kv": n_head_kv, "n_ff": n_ff,
          "n_vocab": vocab, "n_expert": 0}
    return ModelPlan(arch="llama", kv=[], tensors=tensors, hparams=hp, source_kind="gguf")


def _llama_types(src: Path, dst: Path, mix: str, *, pure=False, output_tensor_type=None,
                 token_embedding_type=None, overrides=()) -> dict[str, str]:
    import llama_cpp
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = PRECISIONS[mix].llama_ftype
    p.nthread = 2
    p.pure = pure
    if output_tensor_type:
        p.output_tensor_type = int(GGMLQuantizationType[output_tensor_type])
    if token_embedding_type:
        p.token_embedding_type = int(GGMLQuantizationType[token_embedding_type])
    keep = None
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        keep = [pat.encode() for pat, _ in overrides]
        for i, ((_, typ), pat) in enumerate(zip(overrides, keep)):
            arr[i].pattern = pat
            arr[i].type = int(GGMLQuantizationType[typ])
        arr[len(overrides)].pattern = None
        p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    del keep
    assert rc == 0, f"llama_model_quantize failed for {mix}"
    r = gguf.GGUFReader(str(dst))
    names = [t.name for t in r.tensors]
    assert names == llama_quantize_order(list(reversed(names)))  # the order llama-quantize writes
    return {t.name: t.tensor_type.name for t in r.tensors}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("mix_src")
    out = {}
    for key, cfg in CONFIGS.items():
        _write_gguf(d / f"{key}.gguf", cfg)
        out[key] = d / f"{key}.gguf"
    return out


@pytest.mark.oracle
@pytest.mark.parametrize("cfg_key,pure", [(k, False) for k in CONFIGS] + [("l4_ff640", True), ("l4_e320_ff600", True)])
def test_every_mix_matches_llama_quantize(require_oracle, sources, tmp_path, cfg_key, pure):
    plan = _plan(CONFIGS[cfg_key])
    for mix in (m for m in PRECISIONS if m not in LOWBIT_FTYPES):  # the others: test_mixes_lowbit.py
        expected = _llama_types(sources[cfg_key], tmp_path / f"{mix}.gguf", mix, pure=pure)
        ours = tensor_types(plan, mix, pure=pure)
        diff = {n: (ours.get(n), t) for n, t in expected.items() if ours.get(n) != t}
        assert not diff and set(ours) == set(expected), f"{cfg_key} {mix} pure={pure}: (ours, llama.cpp) {diff}"


OPTION_CASES = [
    ("Q4_K_M", dict(output_tensor_type="Q8_0")),
    ("Q3_K_M", dict(token_embedding_type="Q6_K")),
    ("Q5_K_S", dict(output_tensor_type="Q4_0", token_embedding_type="F16")),
    ("Q4_K_M", dict(overrides=[(r"attn_v", "Q8_0"), (r"blk\.[01]\.ffn_down", "Q5_K"), ("ffn", "Q4_0")])),
    ("Q3_K_M", dict(overrides=[(r"blk\.0\.attn_v", "Q2_K")])),  # manual override skips the i_attention_wv count
    ("Q2_K", dict(pure=True, overrides=[("output", "Q5_1")])),
    ("F16", dict(overrides=[("attn", "Q8_0")], output_tensor_type="Q6_K")),  # overrides only apply to quantized mixes
]


# the IQ4/TQ/MXFP4 tensor types as overrides: ffn_down rows of 640 (l4_ff640) take IQ4_XS -> IQ4_NL and
# TQ* -> Q4_0; rows of 600 or 320 (l4_e320_ff600) fit no quantized type (F16), 32-block types included
NEW_TYPE_CASES = [
    ("Q4_K_M", dict(overrides=[("ffn_down", "IQ4_XS"), ("ffn_up", "TQ1_0"), ("ffn_gate", "TQ2_0"),
                               ("attn_q", "MXFP4"), ("attn_k", "IQ4_NL")])),
    ("Q6_K", dict(overrides=[("ffn", "TQ1_0"), ("attn_[qo]", "IQ4_XS"), ("attn_v", "MXFP4")])),
    ("Q8_0", dict(overrides=[("ffn_down", "IQ4_NL"), ("ffn", "TQ2_0")])),
]


@pytest.mark.oracle
@pytest.mark.parametrize("cfg_key", ["l4_ff640", "l4_e320_ff600"])
@pytest.mark.parametrize("mix,opts", NEW_TYPE_CASES)
def test_new_type_overrides_and_fallbacks_match_llama_quantize(require_oracle, sources, tmp_path, cfg_key, mix,
                                                                 opts):
    expected = _llama_types(sources[cfg_key], tmp_path / "out.gguf", mix, **opts)
    ours = tensor_types(_plan(CONFIGS[cfg_key]), mix, tensor_type_overrides=opts["overrides"])
    assert ours == expected


@pytest.mark.oracle
def test_new_type_output_options_match_llama_quantize_l4(require_oracle, sources, tmp_path):
    """--output-tensor-type / --token-embedding-type with the new types (rows of 256: every type fits)."""
    opts = dict(output_tensor_type="IQ4_XS", token_embedding_type="TQ2_0")
    expected = _llama_types(sources["l4_ff640"], tmp_path / "out.gguf", "Q4_K_M", **opts)
    assert tensor_types(_plan(CONFIGS["l4_ff640"]), "Q4_K_M", **opts) == expected
    assert expected["output.weight"] == "IQ4_XS" and expected["token_embd.weight"] == "TQ2_0"


@pytest.mark.oracle
@pytest.mark.parametrize("cfg_key", ["l4_ff640", "l8_tied"])
@pytest.mark.parametrize("mix,opts", OPTION_CASES)
def test_options_match_llama_quantize(require_oracle, sources, tmp_path, cfg_key, mix, opts):
    expected = _llama_types(sources[cfg_key], tmp_path / "out.gguf", mix, **opts)
    kw = dict(opts)
    kw["tensor_type_overrides"] = kw.pop("overrides", ())
    ours = tensor_types(_plan(CONFIGS[cfg_key]), mix, **kw)
    assert ours == expected


def test_named_types_and_errors():
    assert get_mix("q4_k_m").llama_ftype == 15 and get_mix("Q4_K_M").default_type == "Q4_K"
    assert {m.llama_ftype for m in PRECISIONS.values()} >= {7, 10, 11, 12, 13, 14, 15, 16, 17, 18}
    with pytest.raises(UnsupportedTypeError, match="Q4_K_M"):
        get_mix("Q4_K_X")
    with pytest.raises(UnsupportedTypeError):
        tensor_types(_plan(CONFIGS["l4_ff640"]), "Q4_K_M", tensor_type_overrides=[("attn", "IQ9_Z")])


def test_rules_from_the_c_source():
    """Hand-checked against llama-quant.cpp for the 8-layer model (n_gqa = 4)."""
    t = tensor_types(_plan(CONFIGS["l8_tied"]), "Q4_K_M")
    assert t["token_embd.weight"] == "Q6_K"  # tied embeddings take the output rule
    assert t["output_norm.weight"] == "F32"
    # use_more_bits(i, 8): i < 1 or i >= 7 or (i - 1) % 3 == 2 -> layers 0, 3, 6, 7
    assert [t[f"blk.{i}.attn_v.weight"] for i in range(8)] == [
        "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q4_K", "Q4_K", "Q6_K", "Q6_K"]
    assert t["blk.3.ffn_down.weight"] == "Q6_K" and t["blk.1.ffn_down.weight"] == "Q4_K"
    q2 = tensor_types(_plan(CONFIGS["l8_tied"]), "Q2_K")
    assert q2["blk.0.attn_v.weight"] == "Q4_K"  # n_gqa >= 4
    assert q2["blk.0.ffn_down.weight"] == "Q3_K" and q2["blk.0.attn_output.weight"] == "Q3_K"
    f = tensor_types(_plan(CONFIGS["l4_e320_ff600"]), "Q4_K_S")
    assert f["output.weight"] == "Q8_0"  # 320 % 256 != 0
    assert f["blk.0.attn_q.weight"] == "Q5_0"  # Q4_K fallback
    assert f["blk.0.ffn_down.weight"] == "F16"  # 600 % 32 != 0


def test_requantize_guard():
    plan = _plan(CONFIGS["l4_ff640"])
    q = [PlannedTensor(t.name, t.shape, SourceTensor(t.name, t.shape, "Q8_0" if len(t.shape) == 2 else "F32",
                                                     t.source.reader)) for t in plan.tensors]
    qplan = ModelPlan("llama", [], q, plan.hparams, "gguf")
    with pytest.raises(CheckpointError, match="requantiz"):
        tensor_types(qplan, "Q4_K_M")
    assert tensor_types(qplan, "Q4_K_M", allow_requantize=True)["blk.0.attn_q.weight"] == "Q4_K"
    assert tensor_types(qplan, "Q8_0")["blk.0.attn_q.weight"] == "Q8_0"  # same type: copied, no requantization


def test_hf_plan_types(tmp_path):
    """HF sources: 1-D tensors stay F32 (as convert_hf_to_gguf writes them) whatever the source dtype."""
    block = {"input_layernorm": (256,), "post_attention_layernorm": (256,), "self_attn.q_proj": (256, 256),
             "self_attn.k_proj": (64, 256), "self_attn.v_proj": (64, 256), "self_attn.o_proj": (256, 256),
             "mlp.gate_proj": (512, 256), "mlp.up_proj": (512, 256), "mlp.down_proj": (256, 512)}
    ck = Checkpoint(tmp_path, "safetensors", [], [
        SourceTensor("model.norm.weight", (256,), "BF16", lambda: np.zeros(256, np.float32)),
        SourceTensor("model.embed_tokens.weight", (512, 256), "BF16", lambda: np.zeros((512, 256), np.float32)),
    ] + [SourceTensor(f"model.layers.0.{k}.weight", s, "BF16", lambda s=s: np.zeros(s, np.float32))  # a complete
         for k, s in block.items()],                                                                # model
        config={"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "hidden_size": 256,
                "num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 512, "vocab_size": 512})
    plan = plan_model(ck)
    bf16, q8 = tensor_types(plan, "BF16"), tensor_types(plan, "Q8_0")
    assert {k: bf16[k] for k in ("output_norm.weight", "token_embd.weight", "blk.0.attn_norm.weight")} == {
        "output_norm.weight": "F32", "token_embd.weight": "BF16", "blk.0.attn_norm.weight": "F32"}
    assert {k: q8[k] for k in ("output_norm.weight", "token_embd.weight", "blk.0.attn_norm.weight")} == {
        "output_norm.weight": "F32", "token_embd.weight": "Q8_0", "blk.0.attn_norm.weight": "F32"}
