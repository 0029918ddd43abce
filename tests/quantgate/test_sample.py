"""quantgate.sample: checkpoints written tensor by tensor (valid safetensors, the values of `_weights` for each
tensor in order), large tensors in row blocks, the named shapes (SHAPE_8B is Llama-3-8B's), `sample --shape`."""
from __future__ import annotations

import json

import numpy as np
from safetensors.numpy import load_file
from typer.testing import CliRunner

from quant.loaders import open_checkpoint
from quantgate import sample
from quantgate.cli import app
from quantgate.sample import SHAPE_8B, SampleShape, _tensor_shapes, _weights, make_sample_checkpoint

TINY = SampleShape(n_layer=1, n_embd=128, n_ff=256, n_head=4, n_head_kv=2, n_vocab=256)


def _all(folder) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_streamed_files_hold_each_tensors_draw_in_order(tmp_path):
    d = make_sample_checkpoint(tmp_path / "m", TINY, seed=4, max_shard_bytes=64 << 10)
    got = _all(d)
    rng = np.random.default_rng(4)
    for name, shape in _tensor_shapes(TINY):
        np.testing.assert_array_equal(got[name], _weights(name, shape, rng).astype(np.float16))
    assert len(list(d.glob("*.safetensors"))) > 1 and (d / "model.safetensors.index.json").exists()
    with open_checkpoint(d) as ck:
        assert {t.name for t in ck.tensors} == set(got)


def test_large_tensors_in_row_blocks_and_normal_values(tmp_path, monkeypatch):
    monkeypatch.setattr(sample, "_CHUNKED_ABOVE", 10_000)
    monkeypatch.setattr(sample, "_CHUNK_ELEMENTS", 3_000)
    a = _all(make_sample_checkpoint(tmp_path / "a", TINY, seed=2))
    b = _all(make_sample_checkpoint(tmp_path / "b", TINY, seed=2))
    emb = a["model.embed_tokens.weight"]
    assert emb.shape == (256, 128) and all(np.array_equal(a[k], b[k]) for k in a)  # deterministic in blocks
    assert 0.5 < float(emb.astype(np.float32).std() * np.sqrt(128)) < 2.0
    n = _all(make_sample_checkpoint(tmp_path / "n", SampleShape(**{**TINY.__dict__, "values": "normal"}), seed=2))
    assert n.keys() == a.keys() and not np.array_equal(n["model.layers.0.mlp.up_proj.weight"],
                                                       a["model.layers.0.mlp.up_proj.weight"])


def test_named_shapes_and_cli(tmp_path):
    assert sum(int(np.prod(s)) for _, s in _tensor_shapes(SHAPE_8B)) == 8_030_261_248  # Llama-3-8B
    res = CliRunner().invoke(app, ["sample", "--shape", "9b", "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "--shape must be one of 1b, 8b" in res.output and not (tmp_path / "x").exists()
    res = CliRunner().invoke(app, ["sample", "--out", str(tmp_path / "s"), "--layers", "1", "--embd", "64",
                                   "--ff", "128", "--vocab", "64"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "s" / "quantgate_sample.json").read_text())["n_embd"] == 64
