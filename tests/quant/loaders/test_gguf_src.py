"""open_gguf_checkpoint: float tensors read as float32; quantized ones only with allow_requantize."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf.constants import GGUFValueType as V

import quant
from core.errors import CheckpointError
from quant.gguf_kv import KV
from quant.gguf_writer import TensorSpec, write_gguf
from quant.loaders.gguf_src import open_gguf_checkpoint

pytestmark = pytest.mark.timeout(60)
RNG = np.random.default_rng(11)
X32 = RNG.standard_normal((3, 64)).astype(np.float32)
X16 = RNG.standard_normal((2, 2, 32)).astype(np.float16)
XBF = RNG.standard_normal((2, 32)).astype(np.float32)
BF_BYTES = (XBF.view(np.uint32) >> 16).astype(np.uint16)
KVS = [
    KV("general.architecture", "llama", V.STRING),
    KV("llama.block_count", 1, V.UINT32),
    KV("tokenizer.ggml.tokens", ["a", "b"], V.ARRAY, V.STRING),
]


def _floats() -> list[TensorSpec]:
    return [
        TensorSpec("f32", X32.shape, "F32", lambda: X32.view(np.uint8)),
        TensorSpec("f16", X16.shape, "F16", lambda: X16.view(np.uint8)),
        TensorSpec("bf16", XBF.shape, "BF16", lambda: BF_BYTES.view(np.uint8)),
    ]


def test_float_tensors_and_metadata(tmp_path):
    p = tmp_path / "m.gguf"
    write_gguf(p, kv=KVS, tensors=_floats(), alignment=64)
    with open_gguf_checkpoint(p) as ck:
        assert ck.kind == "gguf" and ck.files == [p] and ck.path == p and ck.gguf_version == 3
        assert [k.key for k in ck.gguf_kv] == [k.key for k in KVS]          # general.alignment dropped
        assert ck.architecture == "llama"
        assert [(t.name, t.shape, t.dtype) for t in ck.tensors] == [
            ("f32", (3, 64), "F32"), ("f16", (2, 2, 32), "F16"), ("bf16", (2, 32), "BF16")]
        np.testing.assert_array_equal(ck.tensor("f32").read(), X32)
        np.testing.assert_array_equal(ck.tensor("f16").read(), X16.astype(np.float32))
        bf = ck.tensor("bf16").read()
        np.testing.assert_array_equal(bf, (BF_BYTES.astype(np.uint32) << 16).view(np.float32))
        assert bf.dtype == np.float32 and (np.abs(bf - XBF) <= np.abs(XBF) * 2.0**-7).all()
        arr = ck.tensor("f32").read()
        arr[0, 0] = 123.0                                                    # reads are private copies
        assert ck.tensor("f32").read()[0, 0] == X32[0, 0]


def test_version_2_is_accepted(tmp_path):
    p = tmp_path / "v2.gguf"
    write_gguf(p, kv=KVS, tensors=_floats())
    data = bytearray(p.read_bytes())
    data[4:8] = struct.pack("<I", 2)
    p.write_bytes(bytes(data))
    with open_gguf_checkpoint(p) as ck:
        assert ck.gguf_version == 2
        np.testing.assert_array_equal(ck.tensor("f32").read(), X32)


def _quantized(tmp_path):
    q = quant.quantize(X32, "Q8_0")
    p = tmp_path / "q.gguf"
    write_gguf(p, kv=KVS, tensors=_floats() + [TensorSpec("blk.0.q", X32.shape, "Q8_0", lambda: q)])
    return p, q


def test_quantized_needs_allow_requantize(tmp_path):
    p, _ = _quantized(tmp_path)
    with pytest.raises(CheckpointError, match=r"'blk\.0\.q'.*Q8_0.*allow_requantize"):
        open_gguf_checkpoint(p)


def test_requantize_warns_and_dequantizes(tmp_path):
    p, q = _quantized(tmp_path)
    with pytest.warns(UserWarning, match="requantizing 1 already-quantized"):
        ck = open_gguf_checkpoint(p, allow_requantize=True)
    with ck:
        t = ck.tensor("blk.0.q")
        assert t.dtype == "Q8_0"
        got = t.read()
        np.testing.assert_array_equal(got, quant.dequantize(q, "Q8_0", X32.shape))
        assert np.abs(got - X32).max() < 0.05


def test_unreadable_type_is_refused(tmp_path):
    p = tmp_path / "i.gguf"
    ints = np.arange(32, dtype=np.int32)
    write_gguf(p, kv=KVS, tensors=[TensorSpec("pos", (32,), "I32", lambda: ints.view(np.uint8))])
    with pytest.raises(CheckpointError, match="'pos' has type I32"):
        open_gguf_checkpoint(p, allow_requantize=True)


def test_split_part_with_a_plain_name_is_refused(tmp_path):
    """split.count 2 in a file not named PREFIX-00001-of-00002.gguf: its other part cannot be found
    (tests/quant/test_gguf_split.py covers real split sets)."""
    p = tmp_path / "s.gguf"
    write_gguf(p, kv=KVS + [KV("split.no", 0, V.UINT16), KV("split.count", 2, V.UINT16)], tensors=_floats())
    with pytest.raises(CheckpointError, match="not a split part name"):
        open_gguf_checkpoint(p)


def test_corrupt_and_missing_files(tmp_path):
    with pytest.raises(CheckpointError, match="no such GGUF file"):
        open_gguf_checkpoint(tmp_path / "missing.gguf")
    p = tmp_path / "bad.gguf"
    write_gguf(p, kv=KVS, tensors=_floats())
    p.write_bytes(p.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="beyond the end of the file"):
        open_gguf_checkpoint(p)


def test_read_scratch_same_values_in_one_reused_buffer(tmp_path):
    """read_scratch (the quantize loop's read: pread into a staging buffer, widened into one reused float32 buffer)
    gives read()'s values; successive calls share the buffer, read() never does."""
    p = tmp_path / "m.gguf"
    write_gguf(p, kv=KVS, tensors=_floats())
    with open_gguf_checkpoint(p) as ck:
        seen = []
        for t in ck.tensors:
            s = t.read_scratch()
            np.testing.assert_array_equal(s, t.read())
            assert s.dtype == np.float32 and s.shape == t.shape
            seen.append(s)
        assert np.shares_memory(seen[0], seen[1]) and np.shares_memory(seen[1], seen[2])
        a, b = ck.tensors[0].read(), ck.tensors[0].read()
        assert not np.shares_memory(a, b) and not np.shares_memory(a, seen[0])


def test_truncated_after_open_is_one_clear_error(tmp_path):
    p = tmp_path / "m.gguf"
    write_gguf(p, kv=KVS, tensors=_floats())
    with open_gguf_checkpoint(p) as ck:
        with open(p, "r+b") as f:
            f.truncate(p.stat().st_size - 64)
        with pytest.raises(CheckpointError, match="truncated while being read"):
            ck.tensors[-1].read()
