"""quant.loaders.safetensors_src and the open_checkpoint dispatcher: lazy reads, shards, index safety, corruption."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from safetensors.torch import save_file as save_torch

from core.errors import CheckpointError
from quant.loaders import open_checkpoint
from quant.loaders.safetensors_src import open_safetensors_checkpoint


def test_single_file_dtypes_and_lazy_reads(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
    b = np.linspace(-2, 2, 6, dtype=np.float16)
    bf = torch.tensor([[1.5, -3.25], [1e-3, 65504.0]], dtype=torch.bfloat16)
    save_torch({"a": torch.from_numpy(a), "b": torch.from_numpy(b), "c": bf}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open_checkpoint(tmp_path) as ck:
        assert ck.kind == "safetensors" and ck.config == {"model_type": "llama"} and ck.architecture == "llama"
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors] == [("a", (3, 4), "F32"), ("b", (6,), "F16"),
                                                                   ("c", (2, 2), "BF16")]
        np.testing.assert_array_equal(ck.tensor("a").read(), a)
        np.testing.assert_array_equal(ck.tensor("b").read(), b.astype(np.float32))
        np.testing.assert_array_equal(ck.tensor("c").read(), bf.float().numpy())
    direct = open_checkpoint(tmp_path / "model.safetensors")
    assert direct.files == [tmp_path / "model.safetensors"]


def test_sharded_index(tmp_path):
    save_file({"x": np.ones((2, 2), np.float32)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"y": np.zeros(3, np.float32)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    idx = {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(idx))
    ck = open_checkpoint(tmp_path)
    assert [t.name for t in ck.tensors] == ["x", "y"] and len(ck.files) == 2
    np.testing.assert_array_equal(ck.tensor("y").read(), np.zeros(3, np.float32))


@pytest.mark.parametrize("shard", ["../evil.safetensors", "/etc/passwd", "sub/../../evil.safetensors"])
def test_index_refuses_escaping_paths(tmp_path, shard):
    d = tmp_path / "m"
    d.mkdir()
    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "evil.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": shard}}))
    with pytest.raises(CheckpointError, match="outside|invalid"):
        open_checkpoint(d)


def test_index_missing_shard_and_mismatch(tmp_path):
    save_file({"x": np.ones(2, np.float32)}, str(tmp_path / "a.safetensors"))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"x": "a.safetensors", "z": "a.safetensors"}}))
    with pytest.raises(CheckpointError, match="disagree"):
        open_checkpoint(tmp_path)


def test_unsupported_dtype_names_tensor(tmp_path):
    save_file({"ids": np.arange(4, dtype=np.int64)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'ids'.*I64"):
        open_checkpoint(tmp_path)


def test_corrupt_and_truncated(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"w": np.ones((64, 64), np.float32)}, str(p))
    data = p.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated|outside"):
        open_safetensors_checkpoint(tmp_path / "trunc.safetensors")
    (tmp_path / "hdr.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    with pytest.raises(CheckpointError, match="header"):
        open_safetensors_checkpoint(tmp_path / "hdr.safetensors")
    (tmp_path / "json.safetensors").write_bytes(struct.pack("<Q", 5) + b"{nope")
    with pytest.raises(CheckpointError, match="JSON"):
        open_safetensors_checkpoint(tmp_path / "json.safetensors")


def test_dispatcher_errors(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        open_checkpoint(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="unknown checkpoint format"):
        open_checkpoint(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        open_checkpoint(tmp_path / "empty")
