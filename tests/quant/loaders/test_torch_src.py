"""quant.loaders.torch_src: weights-only loading of state dicts; code-carrying pickles are refused, never run."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch

from core.errors import CheckpointError, UnsafeCheckpointError
from quant.loaders import open_checkpoint


def test_state_dict_dtypes(tmp_path):
    sd = {"w": torch.randn(3, 4), "h": torch.randn(5).half(), "b": torch.randn(2, 2).bfloat16()}
    torch.save(sd, tmp_path / "pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open_checkpoint(tmp_path) as ck:
        assert ck.kind == "torch" and ck.config == {"model_type": "llama"}
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors] == [("w", (3, 4), "F32"), ("h", (5,), "F16"),
                                                                   ("b", (2, 2), "BF16")]
        for name, t in sd.items():
            np.testing.assert_array_equal(ck.tensor(name).read(), t.float().numpy())
    for ext in (".pt", ".pth"):
        torch.save(sd, tmp_path / f"m{ext}")
        assert [t.name for t in open_checkpoint(tmp_path / f"m{ext}").tensors] == ["w", "h", "b"]


def test_legacy_format_and_sharded(tmp_path):
    torch.save({"a": torch.ones(2)}, tmp_path / "pytorch_model-00001-of-00002.bin",
               _use_new_zipfile_serialization=False)
    torch.save({"b": torch.zeros(2, 2)}, tmp_path / "pytorch_model-00002-of-00002.bin")
    idx = {"weight_map": {"a": "pytorch_model-00001-of-00002.bin", "b": "pytorch_model-00002-of-00002.bin"}}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps(idx))
    ck = open_checkpoint(tmp_path)
    assert [t.name for t in ck.tensors] == ["a", "b"]
    np.testing.assert_array_equal(ck.tensor("a").read(), np.ones(2, np.float32))


class _Payload:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_executed(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": torch.ones(2), "evil": _Payload(str(marker))}, tmp_path / "evil.bin")
    with open(tmp_path / "raw.pt", "wb") as f:
        pickle.dump({"evil": _Payload(str(marker))}, f)
    for name in ("evil.bin", "raw.pt"):
        with pytest.raises(UnsafeCheckpointError, match="not executed"):
            open_checkpoint(tmp_path / name)
    assert not marker.exists()


def test_bad_contents(tmp_path):
    torch.save({"ids": torch.arange(3)}, tmp_path / "ints.bin")
    with pytest.raises(CheckpointError, match="'ids'.*int64"):
        open_checkpoint(tmp_path / "ints.bin")
    torch.save({"step": 3}, tmp_path / "nt.bin")
    with pytest.raises(CheckpointError, match="not a tensor"):
        open_checkpoint(tmp_path / "nt.bin")
    torch.save({"w": torch.randn(64, 64)}, tmp_path / "ok.bin")
    data = (tmp_path / "ok.bin").read_bytes()
    (tmp_path / "trunc.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        open_checkpoint(tmp_path / "trunc.bin")
