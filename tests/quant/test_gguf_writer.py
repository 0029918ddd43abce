"""write_gguf: exact GGUF v3 layout, read back by gguf.GGUFReader and by our reader; atomic and streaming."""
from __future__ import annotations

import gc
import hashlib
import weakref

import gguf
import numpy as np
import pytest
from gguf.constants import GGUFValueType as V

import quant
from core.errors import GGUFFormatError
from quant.gguf_kv import KV
from quant.gguf_reader import read_gguf
from quant.gguf_writer import TensorSpec, build_metadata, write_gguf

pytestmark = pytest.mark.timeout(120)
RNG = np.random.default_rng(1234)


def _bf16_bytes(x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)


def _spec(name, arr_or_bytes, qtype, shape=None) -> TensorSpec:
    raw = np.ascontiguousarray(arr_or_bytes).view(np.uint8)
    return TensorSpec(name, tuple(shape if shape is not None else arr_or_bytes.shape), qtype, lambda: raw)


ALL_KV = [
    KV("general.architecture", "llama", V.STRING),
    KV("general.name", "tiny ünïcode 模型", V.STRING),
    KV("t.u8", 255, V.UINT8), KV("t.i8", -128, V.INT8), KV("t.u16", 65535, V.UINT16), KV("t.i16", -32768, V.INT16),
    KV("t.u32", 2**32 - 1, V.UINT32), KV("t.i32", -(2**31), V.INT32), KV("t.f32", 0.1, V.FLOAT32),
    KV("t.bool", True, V.BOOL), KV("t.u64", 2**64 - 1, V.UINT64), KV("t.i64", -(2**63), V.INT64),
    KV("t.f64", -1e300, V.FLOAT64), KV("t.empty_str", "", V.STRING),
    KV("t.arr_i32", [1, -2, 3], V.ARRAY, V.INT32), KV("t.arr_f32", np.array([0.5, -1.25], np.float32), V.ARRAY, V.FLOAT32),
    KV("t.arr_u8", np.arange(256, dtype=np.uint8), V.ARRAY, V.UINT8), KV("t.arr_bool", [True, False], V.ARRAY, V.BOOL),
    KV("t.arr_u64", [2**64 - 1, 0], V.ARRAY, V.UINT64), KV("t.arr_f64", [1.5], V.ARRAY, V.FLOAT64),
    KV("tokenizer.ggml.tokens", ["<s>", "</s>", "▁hello", "", "é"], V.ARRAY, V.STRING),
]


def _tensors():
    a = RNG.standard_normal((8, 64)).astype(np.float32)
    b = RNG.standard_normal((2, 3, 32)).astype(np.float16)
    c = RNG.standard_normal((4, 32)).astype(np.float32)
    row = RNG.standard_normal((1, 64)).astype(np.float32)
    q8 = quant.quantize(RNG.standard_normal((3, 64)).astype(np.float32), "Q8_0")
    norm = RNG.standard_normal(48).astype(np.float32)   # 192 bytes: needs no padding
    return [
        _spec("a.weight", a, "F32"), _spec("b.weight", b, "F16"), _spec("c.weight", _bf16_bytes(c), "BF16", c.shape),
        _spec("row.weight", row, "F32"), _spec("q8.weight", q8, "Q8_0", (3, 64)), _spec("norm.weight", norm, "F32"),
    ]


def _assert_layout(path, res, alignment):
    data = path.read_bytes()
    assert res.nbytes == len(data)
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    g = read_gguf(path)
    try:
        assert g.version == 3 and g.alignment == alignment
        assert g.data_offset % alignment == 0
        expected = g.data_offset
        for t in g.tensors:
            assert t.offset == expected == res.tensor_offsets[t.name]
            expected += -(-t.nbytes // alignment) * alignment
        assert expected == len(data)
    finally:
        g.close()


@pytest.mark.parametrize("alignment", [32, 64, 256])
def test_roundtrip_both_readers(tmp_path, alignment):
    path = tmp_path / "m.gguf"
    specs = _tensors()
    res = write_gguf(path, kv=ALL_KV, tensors=specs, alignment=alignment)
    _assert_layout(path, res, alignment)

    g = read_gguf(path)
    expect_kv = ALL_KV + ([KV("general.alignment", alignment, V.UINT32)] if alignment != 32 else [])
    assert [k.key for k in g.kv] == [k.key for k in expect_kv]          # order kept, alignment appended
    for got, want in zip(g.kv, expect_kv):
        assert (got.vtype, got.sub_type) == (want.vtype, want.sub_type)
        if want.vtype == V.FLOAT32:
            assert got.value == np.float32(want.value)
        elif want.vtype == V.ARRAY and want.sub_type != V.STRING:
            np.testing.assert_array_equal(got.value, np.array(list(want.value), dtype=got.value.dtype))
        else:
            assert got.value == want.value
    for spec, t in zip(specs, g.tensors):
        assert t.name == spec.name and t.qtype == spec.qtype
        assert bytes(g.tensor_data(t.name)) == spec.produce().tobytes()
    assert g.tensor("row.weight").shape == (64,)       # ggml_n_dims drops trailing ne == 1, as ggml writes it
    assert g.tensor("b.weight").shape == (2, 3, 32)
    g.close()

    r = gguf.GGUFReader(path)
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == [k.key for k in expect_kv]
    for want in expect_kv:
        f = fields[want.key]
        assert f.types[0] == want.vtype
        if want.vtype == V.ARRAY:
            assert f.types[1] == want.sub_type
            got = f.contents()
            if want.sub_type == V.STRING:
                assert got == list(want.value)
            else:
                np.testing.assert_array_equal(np.asarray(got), np.array(list(want.value), dtype=np.asarray(got).dtype))
        elif want.vtype == V.FLOAT32:
            assert f.contents() == pytest.approx(float(np.float32(want.value)), abs=0)
        else:
            assert f.contents() == want.value
    for spec, t in zip(specs, r.tensors):
        assert t.name == spec.name and t.tensor_type.name == spec.qtype
        assert t.data_offset == res.tensor_offsets[spec.name]
        assert np.asarray(t.data).view(np.uint8).tobytes() == spec.produce().tobytes()


def test_bytes_identical_to_gguf_writer(tmp_path):
    """For input GGUFWriter can express, our bytes are exactly GGUFWriter's."""
    kv = [k for k in ALL_KV if k.key != "t.empty_str"]
    specs = [s for s in _tensors() if s.name != "row.weight"]   # GGUFWriter keeps len(shape) dims
    ours = tmp_path / "ours.gguf"
    write_gguf(ours, kv=kv, tensors=specs)
    w = gguf.GGUFWriter(tmp_path / "ref.gguf", "llama")
    for k in kv[1:]:
        w.add_key_value(k.key, k.value.tolist() if isinstance(k.value, np.ndarray) else k.value, k.vtype, k.sub_type)
    for s in specs:
        w.add_tensor_info(s.name, s.shape, np.dtype(np.float32), s.produce().nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[s.qtype])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for s in specs:
        w.write_tensor_data(s.produce())
    w.close()
    assert ours.read_bytes() == (tmp_path / "ref.gguf").read_bytes()


def test_empty_array_and_no_tensors(tmp_path):
    path = tmp_path / "e.gguf"
    kv = [KV("general.architecture", "x", V.STRING), KV("a", [], V.ARRAY, V.INT32), KV("s", [], V.ARRAY, V.STRING)]
    res = write_gguf(path, kv=kv, tensors=[])
    g = read_gguf(path)
    assert g.tensors == [] and len(g.value("a")) == 0 and g.value("s") == []
    assert res.nbytes == path.stat().st_size
    g.close()


def test_on_tensor_progress(tmp_path):
    calls = []
    specs = _tensors()
    write_gguf(tmp_path / "p.gguf", kv=ALL_KV[:1], tensors=specs, on_tensor=lambda i, n, name: calls.append((i, n, name)))
    assert calls == [(i + 1, len(specs), s.name) for i, s in enumerate(specs)]


def test_streams_one_tensor_at_a_time(tmp_path):
    """At most one earlier buffer is alive when a tensor is produced (the one the writer thread may still be hashing
    and writing): memory does not grow with the number of tensors."""
    refs: list[weakref.ref] = []
    alive_at_call: list[int] = []

    def make(i):
        def produce():
            gc.collect()
            alive_at_call.append(sum(r() is not None for r in refs))
            arr = np.full(4096, i, dtype=np.uint8)
            refs.append(weakref.ref(arr))
            return arr
        return produce

    specs = [TensorSpec(f"t{i}", (1024,), "F32", make(i)) for i in range(8)]
    write_gguf(tmp_path / "s.gguf", kv=ALL_KV[:1], tensors=specs)
    assert alive_at_call[0] == 0 and max(alive_at_call) <= 1 and len(alive_at_call) == 8


def _bad(name, shape=(32,), qtype="F32"):
    def produce():
        raise AssertionError("produce() must not be called for invalid metadata")
    return TensorSpec(name, shape, qtype, produce)


@pytest.mark.parametrize(
    "kv, tensors, msg",
    [
        ([KV("k", 1, V.UINT32), KV("k", 2, V.UINT32)], [], "duplicate KV key"),
        ([KV("", 1, V.UINT32)], [], "non-empty"),
        ([], [_bad("t"), _bad("t")], "duplicate tensor name"),
        ([], [_bad("x" * 64)], "at most 63"),
        ([], [_bad("t", (3, 33), "Q8_0")], "block size"),
        ([], [_bad("t", (32,), "Q9_9")], "unknown ggml type"),
        ([], [_bad("t", (1, 1, 1, 1, 32))], "at most 4"),
        ([], [_bad("t", (0, 32))], "positive"),
        ([KV("a", [1], V.ARRAY)], [], "sub_type"),
        ([KV("a", 256, V.UINT8)], [], "does not fit"),
        ([KV("a", [1, 70000], V.ARRAY, V.UINT16)], [], "do not fit"),
        ([KV("a", [1.5], V.ARRAY, V.INT32)], [], "expected integers"),
        ([KV("a", 1e39, V.FLOAT32)], [], "does not fit"),
        ([KV("a", "s", V.UINT32)], [], "expected an integer"),
        ([KV("a", 3, V.STRING)], [], "expected a string"),
        ([KV("a", 2, V.BOOL)], [], "expected a bool"),
        ([KV("a", "abc", V.ARRAY, V.STRING)], [], "single string"),
        ([KV("a", [[1]], V.ARRAY, V.ARRAY)], [], "arrays of arrays"),
        ([KV("general.alignment", 64, V.UINT32)], [], "alignment"),
    ],
)
def test_refuses_invalid_metadata_before_writing(tmp_path, kv, tensors, msg):
    path = tmp_path / "bad.gguf"
    with pytest.raises(GGUFFormatError, match=msg):
        write_gguf(path, kv=kv, tensors=tensors)
    assert list(tmp_path.iterdir()) == []


def test_refuses_bad_alignment(tmp_path):
    for a in (0, 48, -32):
        with pytest.raises(GGUFFormatError, match="power of 2"):
            write_gguf(tmp_path / "a.gguf", kv=[], tensors=[], alignment=a)
    assert list(tmp_path.iterdir()) == []


def test_matching_alignment_kv_is_kept_in_place(tmp_path):
    kv = [KV("general.alignment", 64, V.UINT32), KV("general.architecture", "x", V.STRING)]
    write_gguf(tmp_path / "a.gguf", kv=kv, tensors=_tensors()[:2], alignment=64)
    g = read_gguf(tmp_path / "a.gguf")
    assert [k.key for k in g.kv] == ["general.alignment", "general.architecture"] and g.alignment == 64
    g.close()


@pytest.mark.parametrize(
    "produced, msg",
    [(np.zeros(127, np.uint8), "returned 127 bytes"), (np.zeros(129, np.uint8), "returned 129 bytes"),
     (np.zeros(32, np.float32), "uint8"), (b"\x00" * 128, "uint8")],
)
def test_refuses_wrong_produced_bytes(tmp_path, produced, msg):
    target = tmp_path / "out.gguf"
    target.write_bytes(b"old model")
    specs = [_tensors()[0], TensorSpec("bad", (32,), "F32", lambda: produced)]
    with pytest.raises(GGUFFormatError, match=msg):
        write_gguf(target, kv=ALL_KV[:1], tensors=specs)
    assert target.read_bytes() == b"old model"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_crash_mid_file_leaves_nothing(tmp_path):
    calls = []

    def boom():
        calls.append(1)
        raise RuntimeError("quantization failed")

    specs = _tensors()
    specs.insert(3, TensorSpec("boom", (32,), "F32", boom))
    target = tmp_path / "out.gguf"
    with pytest.raises(RuntimeError, match="quantization failed"):
        write_gguf(target, kv=ALL_KV, tensors=specs)
    assert calls == [1]
    assert list(tmp_path.iterdir()) == []

    target.write_bytes(b"existing")
    with pytest.raises(RuntimeError):
        write_gguf(target, kv=ALL_KV, tensors=specs)
    assert target.read_bytes() == b"existing"
    assert [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


def test_build_metadata_is_padded_header(tmp_path):
    specs = _tensors()
    meta, offsets, sizes = build_metadata(ALL_KV, specs, 32)
    res = write_gguf(tmp_path / "m.gguf", kv=ALL_KV, tensors=specs)
    assert (tmp_path / "m.gguf").read_bytes()[: len(meta)] == meta
    assert len(meta) % 32 == 0
    assert [len(meta) + o for o in offsets] == list(res.tensor_offsets.values())
    assert sizes == [s.produce().nbytes for s in specs]


@pytest.mark.oracle
@pytest.mark.parametrize("alignment", [32, 64])
def test_ggml_rewrites_identical_metadata(tmp_path, require_oracle, alignment):
    """ggml loads our file and writes back header + KV + tensor infos + padding byte-for-byte identical."""
    from tests.quant.test_gguf_reader import ggml_gguf_lib, ggml_open

    lib = ggml_gguf_lib(require_oracle)
    path = tmp_path / "m.gguf"
    specs = _tensors()
    write_gguf(path, kv=ALL_KV, tensors=specs, alignment=alignment)
    meta, _, _ = build_metadata(ALL_KV, specs, alignment)
    ctx = ggml_open(lib, path)
    assert ctx, "ggml refused our file"
    try:
        assert lib.gguf_write_to_file(ctx, str(tmp_path / "meta.bin").encode(), True)
    finally:
        lib.gguf_free(ctx)
    assert (tmp_path / "meta.bin").read_bytes() == meta


def test_final_kv_rewrites_the_header_and_hashes_the_whole_file(tmp_path):
    """final_kv: values known only after the tensors (the fingerprint the quantize loop computes) replace their
    same-length placeholders; the returned SHA-256 is the final file's."""
    x = RNG.standard_normal((4, 64)).astype(np.float32)
    specs = [_spec("a", x, "F32"), _spec("b", x[:1], "F32")]
    placeholder = [KV("general.architecture", "llama", V.STRING), KV("q.fp", "0" * 64, V.STRING)]
    final = [placeholder[0], KV("q.fp", "ab" * 32, V.STRING)]
    calls = []
    res = write_gguf(tmp_path / "m.gguf", kv=placeholder, tensors=specs,
                     final_kv=lambda: calls.append(1) or final)
    data = (tmp_path / "m.gguf").read_bytes()
    assert calls == [1] and res.sha256 == hashlib.sha256(data).hexdigest()
    ref = write_gguf(tmp_path / "ref.gguf", kv=final, tensors=specs)
    assert data == (tmp_path / "ref.gguf").read_bytes() and res.sha256 == ref.sha256
    with read_gguf(tmp_path / "m.gguf") as g:
        assert g.value("q.fp") == "ab" * 32


def test_final_kv_of_another_length_is_refused_and_nothing_published(tmp_path):
    x = RNG.standard_normal((2, 32)).astype(np.float32)
    kv = [KV("q.fp", "0" * 64, V.STRING)]
    with pytest.raises(GGUFFormatError, match="header's length"):
        write_gguf(tmp_path / "m.gguf", kv=kv, tensors=[_spec("a", x, "F32")],
                   final_kv=lambda: [KV("q.fp", "short", V.STRING)])
    assert list(tmp_path.iterdir()) == []
