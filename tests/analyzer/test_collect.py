"""Importance matrices collected with forward hooks: layout, counts, values, file round trip, and bit-exact
imatrix-weighted quantization against ggml."""
from __future__ import annotations

import numpy as np
import pytest

from tests.analyzer.conftest import CHUNK


@pytest.fixture(scope="module")
def collected(tiny_model, calib_jsonl):
    from analyzer.collect import collect_imatrix
    from runtime.datasets import load_dataset

    texts = [s.text for s in load_dataset(calib_jsonl).usable()]
    return collect_imatrix(tiny_model, texts, chunk_size=CHUNK, n_chunks=3, dataset_name="calib.jsonl")


def test_one_entry_per_2d_matmul_weight_with_lengths_and_counts(collected, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    n_layer = model.config.num_hidden_layers
    assert len(linears) == 7 * n_layer + 1  # q k v o gate up down per layer, and lm_head
    expected = {f"blk.{i}.{t}.weight" for i in range(n_layer)
                for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")}
    expected.add("output.weight")
    assert set(collected.entries) == expected
    cols = {"attn_output": model.config.hidden_size, "ffn_down": model.config.intermediate_size}
    for name, e in collected.entries.items():
        kind = name.split(".")[-2]
        assert e.sums.shape == (cols.get(kind, model.config.hidden_size),), name
        assert e.counts.tolist() == [3 * CHUNK], name  # one count per dense tensor: tokens seen
        assert np.all(e.sums > 0)
    assert collected.chunk_count == 3 and collected.chunk_size == CHUNK
    assert collected.datasets == ["calib.jsonl"]


def test_values_are_mean_squared_inputs_of_the_matmul(collected, tiny_model, calib_jsonl):
    import torch

    from runtime.backends.torch_backend import load_torch_model
    from runtime.datasets import load_dataset
    from runtime.tokenize import calibration_chunks

    toks = calibration_chunks(tiny_model, [s.text for s in load_dataset(calib_jsonl).usable()], CHUNK, 3)
    assert all(c[0] == 1 for c in toks.chunks)  # BOS replaces each chunk's first token, as llama-imatrix does
    model = load_torch_model(tiny_model)
    acc = 0.0
    with torch.inference_mode():
        for c in toks.chunks:
            h = model(input_ids=torch.tensor([c]), output_hidden_states=True).hidden_states[-1]  # after the final norm
            acc = acc + (h[0].double() ** 2).sum(0).numpy()
    np.testing.assert_allclose(collected.values("output.weight"), acc / (3 * CHUNK), rtol=2e-5)


def test_gguf_and_legacy_files_round_trip(collected, tmp_path):
    from quant.imatrix import (
        legacy_to_raw,
        load_imatrix,
        save_imatrix_gguf,
        save_imatrix_legacy,
    )

    save_imatrix_gguf(collected, tmp_path / "i.gguf")
    back = load_imatrix(tmp_path / "i.gguf")
    assert set(back.entries) == set(collected.entries)
    for n in collected.entries:
        np.testing.assert_array_equal(back.values(n), collected.values(n))
    save_imatrix_legacy(collected, tmp_path / "i.dat")
    legacy = load_imatrix(tmp_path / "i.dat")
    for n in collected.entries:
        np.testing.assert_allclose(legacy.values(n), collected.values(n), rtol=1e-6)
    assert legacy_to_raw(legacy, CHUNK).chunk_count == collected.chunk_count


def test_too_little_text_is_a_clear_error(tiny_model):
    from core.errors import QuantGateError
    from runtime.tokenize import calibration_chunks

    with pytest.raises(QuantGateError, match="fewer than one chunk"):
        calibration_chunks(tiny_model, ["short"], 512)


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_quantization_with_our_imatrix_is_bit_exact_with_ggml(require_oracle, collected, tiny_model, tmp_path,
                                                              qtype):
    from safetensors.numpy import load_file

    import quant
    from quant.imatrix import load_imatrix, save_imatrix_gguf

    save_imatrix_gguf(collected, tmp_path / "i.gguf")
    imat = load_imatrix(tmp_path / "i.gguf")  # what `quantgate quantize --imatrix` hands the kernels
    weights = load_file(str(tiny_model / "model.safetensors"))
    for hf, gg in (("model.layers.0.mlp.down_proj.weight", "blk.0.ffn_down.weight"),
                   ("model.layers.1.self_attn.v_proj.weight", "blk.1.attn_v.weight")):
        x = weights[hf].astype(np.float32)
        w = imat.values(gg)
        ours = quant.quantize(x, qtype, imatrix=w)
        ref = require_oracle.ggml_quantize(x, qtype, w)
        assert np.array_equal(ours, ref), f"{gg} {qtype}"


#: tiny MoE arch -> (per-expert HF weight names: gate, up, down; router), as the checkpoints store them
_MOE_NAMES = {
    "mixtral": ("block_sparse_moe.experts.{e}.w1", "block_sparse_moe.experts.{e}.w3",
                "block_sparse_moe.experts.{e}.w2", "block_sparse_moe.gate"),
    "qwen2moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj", "mlp.gate"),
    "qwen3moe": ("mlp.experts.{e}.gate_proj", "mlp.experts.{e}.up_proj", "mlp.experts.{e}.down_proj", "mlp.gate"),
}


@pytest.mark.parametrize("arch", sorted(_MOE_NAMES))
def test_moe_imatrix_is_per_expert_as_llama_imatrix_collects_mul_mat_id(arch, calib_jsonl, tmp_path):
    """Fused experts (llama.cpp's MUL_MAT_ID, imatrix.cpp collect_imatrix): per expert, the sums of squared inputs
    of the tokens routed to it (gate/up: the MoE block's input; down: that expert's SwiGLU output) and one count per
    routed (token, slot); stored n_expert x cols with n_expert counts. Checked against a direct numpy computation
    from the checkpoint's per-expert weights, with the routing recomputed from the router weight (softmax, top-k)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    from analyzer.collect import collect_imatrix
    from quant.imatrix import load_imatrix, save_imatrix_gguf
    from runtime.datasets import load_dataset
    from runtime.tokenize import calibration_chunks
    from tests.quantgate.tiny_hf import make_tiny_model

    hf = make_tiny_model(tmp_path / arch, arch, seed=5)
    texts = [s.text for s in load_dataset(calib_jsonl).usable()]
    toks = calibration_chunks(hf, texts, CHUNK, 3)
    im = collect_imatrix(hf, [], tokens=toks)          # block by block (runtime.layer_stream), float32
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).eval()
    cfg = model.config
    n_exp, k = int(getattr(cfg, "num_local_experts", None) or cfg.num_experts), int(cfg.num_experts_per_tok)
    moe_in: dict[int, list[np.ndarray]] = {}
    hooks = [layer.mlp.register_forward_hook(
        lambda _m, a, _o, i=i: moe_in.setdefault(i, []).append(a[0].reshape(-1, a[0].shape[-1]).numpy().copy()))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for c in toks.chunks:
            model(torch.tensor([c]))
    for h in hooks:
        h.remove()
    g_name, u_name, d_name, r_name = _MOE_NAMES[arch]
    f = safe_open(str(hf / "model.safetensors"), "np")
    for i in range(cfg.num_hidden_layers):
        w = lambda n, e=0: f.get_tensor(f"model.layers.{i}.{n.format(e=e)}.weight").astype(np.float64)  # noqa: E731
        x = np.concatenate(moe_in[i]).astype(np.float64)
        logits = x @ w(r_name).T
        top = np.argsort(-logits, axis=1)[:, :k]                    # softmax is monotone: top-k of the logits
        want = {t: (np.zeros((n_exp, x.shape[1] if t != "down" else w(d_name).shape[1])), np.zeros(n_exp))
                for t in ("gate", "up", "down")}
        for e in range(n_exp):
            xe = x[(top == e).any(axis=1)]
            g, u = xe @ w(g_name, e).T, xe @ w(u_name, e).T
            act = g / (1.0 + np.exp(-g)) * u
            for t, v in (("gate", xe), ("up", xe), ("down", act)):
                want[t][0][e] += (v * v).sum(axis=0)
                want[t][1][e] += len(xe)
        for t in ("gate", "up", "down"):
            got = im.entries[f"blk.{i}.ffn_{t}_exps.weight"]
            assert got.counts.tolist() == want[t][1].tolist(), (i, t)
            assert got.sums.shape == (want[t][0].size,)
            np.testing.assert_allclose(got.sums.reshape(n_exp, -1), want[t][0], rtol=2e-4, atol=1e-6)
        assert want["gate"][1].sum() == len(toks.chunks) * CHUNK * k   # every token counted once per used expert
        router = im.entries[f"blk.{i}.ffn_gate_inp.weight"]              # a dense MUL_MAT, as llama-imatrix has it
        assert router.counts.tolist() == [len(toks.chunks) * CHUNK]
        np.testing.assert_allclose(router.sums, (x * x).sum(axis=0), rtol=2e-4)
    # the GGUF file holds them as llama-imatrix writes 3-D entries: in_sum2 ne (cols, n_expert), counts (1, n_expert)
    save_imatrix_gguf(im, tmp_path / "i.gguf")
    import gguf

    r = gguf.GGUFReader(str(tmp_path / "i.gguf"))
    by = {t.name: t for t in r.tensors}
    assert [int(d) for d in by["blk.0.ffn_down_exps.weight.in_sum2"].shape] == [w(d_name).shape[1], n_exp]
    assert [int(d) for d in by["blk.0.ffn_down_exps.weight.counts"].shape] == [1, n_exp]
    back = load_imatrix(tmp_path / "i.gguf")
    e = im.entries["blk.1.ffn_up_exps.weight"]
    vals = back.values("blk.1.ffn_up_exps.weight").reshape(n_exp, -1)   # what llama-quantize hands each expert
    for x in range(n_exp):
        np.testing.assert_array_equal(vals[x], (e.sums.reshape(n_exp, -1)[x] / e.counts[x]).astype(np.float32)
                                      if e.counts[x] else np.ones(vals.shape[1], np.float32))


def test_moe_imatrix_streamed_equals_whole_model_and_gguf_source(calib_jsonl, tmp_path, monkeypatch):
    """The block-by-block collection of a MoE model (one block in memory) gives the whole-model hooks' values,
    and the model's F16 GGUF gives the HF folder's (same token ids)."""
    from analyzer import collect
    from quantgate.convert import convert_model
    from runtime.datasets import load_dataset
    from runtime.tokenize import calibration_chunks
    from tests.quantgate.tiny_hf import make_tiny_model

    hf = make_tiny_model(tmp_path / "q2", "qwen2moe", seed=6)
    convert_model(hf, tmp_path / "q2.gguf", "f16")
    toks = calibration_chunks(hf, [s.text for s in load_dataset(calib_jsonl).usable()], CHUNK, 2)
    streamed = collect.collect_imatrix(hf, [], tokens=toks)
    from_gguf = collect.collect_imatrix(tmp_path / "q2.gguf", [], tokens=toks)
    monkeypatch.setattr(collect, "MOE_STREAM_TYPES", frozenset())
    whole = collect.collect_imatrix(hf, [], tokens=toks)
    assert set(streamed.entries) == set(whole.entries) == set(from_gguf.entries)
    assert any(n.endswith("_exps.weight") for n in streamed.entries)
    assert "blk.0.ffn_gate_inp_shexp.weight" in streamed.entries and "blk.0.ffn_up_shexp.weight" in streamed.entries
    for n, e in streamed.entries.items():
        for other in (whole, from_gguf):
            assert np.array_equal(e.counts, other.entries[n].counts), n
            np.testing.assert_allclose(e.sums, other.entries[n].sums, rtol=1e-5, err_msg=n)


def test_streamed_collection_reports_every_block_of_every_chunk_group(tiny_model, calib_jsonl, monkeypatch):
    """Layer by layer, progress hears of each block done per group of chunks (how far an hours-long collection on
    an 8B model got), ending at n/n; the sums do not depend on the grouping."""
    import analyzer.collect as collect
    from runtime.datasets import load_dataset

    texts = [s.text for s in load_dataset(calib_jsonl).usable()]
    one_group = collect.collect_imatrix(tiny_model, texts, chunk_size=CHUNK, n_chunks=3)
    monkeypatch.setattr(collect, "DEFAULT_ACTIVATION_BUDGET", 2 * 4 * CHUNK * 256)  # one chunk per group
    events = []
    grouped = collect.collect_imatrix(tiny_model, texts, chunk_size=CHUNK, n_chunks=3,
                                      progress=lambda i, n, what: events.append((i, n, what)))
    assert [(i, n) for i, n, _ in events] == [(i, 6) for i in range(1, 7)]  # 3 groups x 2 blocks
    assert events[0][2] == "imatrix: chunks 1-1 of 3, block 1/2 done"
    assert events[-1][2] == "imatrix: chunks 3-3 of 3, block 2/2 done"
    for name, e in one_group.entries.items():
        np.testing.assert_array_equal(grouped.entries[name].sums, e.sums, err_msg=name)
