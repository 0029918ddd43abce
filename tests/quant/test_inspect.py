"""inspect_gguf: metadata with big arrays summarized, a tensor table and size totals."""
from __future__ import annotations

import json

import numpy as np
import pytest
from gguf.constants import GGUFValueType as V
from rich.console import Console

import quant
from core.errors import GGUFFormatError
from quant.gguf_kv import KV
from quant.gguf_writer import TensorSpec, write_gguf
from quant.inspect import inspect_gguf

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def model(tmp_path):
    x = np.random.default_rng(3).standard_normal((4, 64)).astype(np.float32)
    q8 = quant.quantize(x, "Q8_0")
    norm = np.ones(64, np.float32)
    kv = [
        KV("general.architecture", "llama", V.STRING),
        KV("general.file_type", 7, V.UINT32),
        KV("llama.rope.freq_base", 10000.0, V.FLOAT32),
        KV("tokenizer.ggml.tokens", [f"tok{i}" for i in range(1000)], V.ARRAY, V.STRING),
        KV("tokenizer.ggml.scores", np.zeros(1000, np.float32), V.ARRAY, V.FLOAT32),
        KV("small.list", [1, 2, 3], V.ARRAY, V.INT32),
        KV("tokenizer.chat_template", "{% for m in messages %}[INST] {{ m }}{% endfor %}" * 10, V.STRING),
    ]
    specs = [
        TensorSpec("blk.0.attn_q.weight", (4, 64), "Q8_0", lambda: q8),
        TensorSpec("blk.0.attn_q2.weight", (4, 64), "Q8_0", lambda: q8),
        TensorSpec("output_norm.weight", (64,), "F32", lambda: norm.view(np.uint8)),
    ]
    p = tmp_path / "m.gguf"
    write_gguf(p, kv=kv, tensors=specs)
    return p


def test_report_contents(model):
    r = inspect_gguf(model)
    assert r.version == 3 and r.alignment == 32 and r.file_size == model.stat().st_size
    assert r.metadata["tokenizer.ggml.tokens"] == "[1000 strings]"
    assert r.metadata["tokenizer.ggml.scores"] == "[1000 float32]"
    assert r.metadata["small.list"] == [1, 2, 3]
    assert r.metadata["llama.rope.freq_base"] == 10000.0 and r.metadata["general.file_type"] == 7
    assert r.metadata_types["tokenizer.ggml.tokens"] == "array[string]"
    assert r.metadata_types["general.file_type"] == "uint32"
    q = r.tensors[0]
    assert (q.name, q.type, q.shape, q.n_elements, q.bytes, q.bits_per_weight) == (
        "blk.0.attn_q.weight", "Q8_0", [4, 64], 256, 272, 8.5)
    assert r.tensors[2].bits_per_weight == 32.0
    assert r.totals == {
        "tensors": 3, "parameters": 576, "bytes": 272 * 2 + 256,
        "bits_per_weight": 8.0 * (272 * 2 + 256) / 576, "tensors_per_type": {"Q8_0": 2, "F32": 1},
    }


def test_to_json_round_trips(model):
    r = inspect_gguf(model)
    d = json.loads(r.to_json())
    assert d["totals"]["parameters"] == 576
    assert d["tensors"][2]["name"] == "output_norm.weight"
    assert d["metadata"]["tokenizer.chat_template"].startswith("{% for m in messages %}[INST]")


def test_render(model):
    console = Console(record=True, width=200)
    inspect_gguf(model).render(console)
    out = console.export_text()
    for needle in ["blk.0.attn_q.weight", "Q8_0", "4x64", "8.50", "[1000 strings]", "576 parameters",
                   "Q8_0: 2, F32: 1", "[INST]", "chars)"]:
        assert needle in out, needle


def test_bad_file_raises_format_error(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)
    with pytest.raises(GGUFFormatError):
        inspect_gguf(p)
