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
