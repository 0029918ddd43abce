"""quant.imatrix against llama.cpp's imatrix writers/readers (tools/imatrix, common/imatrix-loader, tools/quantize)."""
from __future__ import annotations

import ctypes
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType, GGUFValueType
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import CheckpointError, GGUFFormatError
from quant.imatrix import (
    Imatrix,
    ImatrixEntry,
    legacy_to_raw,
    load_imatrix,
    save_imatrix_gguf,
    save_imatrix_legacy,
)


def _sample(rng: np.random.Generator | None = None) -> Imatrix:
    """A dense entry, a dense entry with zero count, and a 4-expert MoE entry with one unused expert."""
    rng = rng or np.random.default_rng(0)
    moe_counts = np.array([37, 0, 5, 120], np.float32)
    return Imatrix(
        entries={
            "blk.0.attn_q.weight": ImatrixEntry(rng.random(64, dtype=np.float32) * 50, np.array([300], np.float32)),
            "blk.1.ffn_down.weight": ImatrixEntry(rng.random(32, dtype=np.float32), np.array([0], np.float32)),
            "blk.0.ffn_up_exps.weight": ImatrixEntry(
                rng.random(4 * 16, dtype=np.float32) * np.repeat(moe_counts, 16), moe_counts),
            "output.weight": ImatrixEntry(rng.random(64, dtype=np.float32) * 7, np.array([300], np.float32)),
        },
        datasets=["wiki.train.raw", "calib/more.txt"],
        chunk_count=2,
        chunk_size=128,
    )


def _values_c(sums: np.ndarray, counts: np.ndarray, legacy: bool) -> np.ndarray:
    """Scalar transcription of quantize.cpp's load_imatrix loops, float32 arithmetic as in C."""
    out = np.zeros(sums.size, np.float32)
    if legacy:
        ncall = int(counts[0])
        for i in range(sums.size):
            out[i] = np.float32(sums[i]) / np.float32(ncall) if ncall > 0 else sums[i]
        return out
    ne0 = sums.size // counts.size
    for j in range(counts.size):
        count = np.float32(int(np.floor(np.float64(counts[j]) + 0.5)))  # (float) lround
        for i in range(ne0):
            out[j * ne0 + i] = np.float32(sums[j * ne0 + i]) / count if count > 0 else np.float32(1)
    return out


# ------------------------------------------------------------------------------------------ round trips


def test_gguf_round_trip(tmp_path: Path) -> None:
    im = _sample()
    p = tmp_path / "imatrix.gguf"
    save_imatrix_gguf(im, p)
    back = load_imatrix(p)
    assert not back.is_legacy
    assert back.datasets == im.datasets and back.chunk_count == 2 and back.chunk_size == 128
    assert set(back.entries) == set(im.entries)
    for name, e in im.entries.items():
        np.testing.assert_array_equal(back.entries[name].sums, e.sums)
        np.testing.assert_array_equal(back.entries[name].counts, e.counts)
    save_imatrix_gguf(back, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == p.read_bytes()
    assert [f.name for f in tmp_path.iterdir() if f.name.endswith(".tmp")] == []


def test_legacy_round_trip_is_byte_stable(tmp_path: Path) -> None:
    im = _sample()
    p1, p2 = tmp_path / "a.dat", tmp_path / "b.dat"
    save_imatrix_legacy(im, p1)
    back = load_imatrix(p1)
    assert back.is_legacy and back.chunk_count == 2 and back.chunk_size == 0
    assert back.datasets == ["calib/more.txt"]  # the legacy trailer keeps only the last dataset
    assert "blk.1.ffn_down.weight" not in back.entries  # all counts zero: "has no data - skipping"
    save_imatrix_legacy(back, p2)
    assert p2.read_bytes() == p1.read_bytes()


@settings(max_examples=40, deadline=None)
@given(
    ne0=st.integers(1, 40), n_exp=st.integers(1, 5), chunk_size=st.integers(1, 600),
    seed=st.integers(0, 2**31), scale=st.sampled_from([1e-6, 1.0, 1e4]),
)
def test_both_formats_property(tmp_path_factory, ne0, n_exp, chunk_size, seed, scale) -> None:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, 3000, n_exp).astype(np.float32)
    im = Imatrix({"blk.3.ffn_gate_exps.weight": ImatrixEntry(rng.random(ne0 * n_exp, dtype=np.float32) * scale,
                                                             counts)},
                 ["d"], int(rng.integers(0, 50)), chunk_size)
    d = tmp_path_factory.mktemp("prop")
    save_imatrix_gguf(im, d / "x.gguf")
    g = load_imatrix(d / "x.gguf")
    e = im.entries["blk.3.ffn_gate_exps.weight"]
    np.testing.assert_array_equal(g.values("blk.3.ffn_gate_exps.weight"), _values_c(e.sums, e.counts, False))
    save_imatrix_legacy(g, d / "x.dat")
    assert (d / "x.dat").read_bytes() == _legacy_by_hand(im)
    if counts.max() > 0:
        lg = load_imatrix(d / "x.dat")
        le = lg.entries["blk.3.ffn_gate_exps.weight"]
        np.testing.assert_array_equal(lg.values("blk.3.ffn_gate_exps.weight"), _values_c(le.sums, le.counts, True))


# ------------------------------------------------------------------------------------------ legacy bytes


def _legacy_by_hand(im: Imatrix) -> bytes:
    """save_imatrix_legacy transcribed statement by statement with struct.pack and scalar float32 maths."""
    to_store = []
    for name, e in im.entries.items():
        counts = [int(c) for c in e.counts]
        if all(c == 0 for c in counts):
            continue
        to_store.append(name)
    to_store.sort(key=lambda s: s.encode())
    out = struct.pack("<i", len(to_store))
    for name in to_store:
        e = im.entries[name]
        counts = [int(c) for c in e.counts]
        out += struct.pack("<i", len(name)) + name.encode()
        ncall = (max(counts) + (im.chunk_size - 1)) // im.chunk_size
        out += struct.pack("<i", ncall)
        nval, nmat = e.sums.size, len(counts)
        out += struct.pack("<i", nval)
        for i in range(nval):
            count = np.float32(counts[i // (nval // nmat)])
            value = np.float32(e.sums[i])
            if count == 0:
                value, count = np.float32(1), np.float32(1)
            out += struct.pack("<f", (value / count) * np.float32(ncall))
    out += struct.pack("<i", im.chunk_count)
    ds = im.datasets[-1].encode() if im.datasets else b""
    out += struct.pack("<i", len(ds)) + ds
    return out


def test_legacy_bytes_equal_hand_assembled(tmp_path: Path) -> None:
    im = _sample()
    save_imatrix_legacy(im, tmp_path / "i.dat")
    assert (tmp_path / "i.dat").read_bytes() == _legacy_by_hand(im)


def test_legacy_without_datasets_writes_zero_length_name(tmp_path: Path) -> None:
    im = _sample()
    im.datasets = []
    save_imatrix_legacy(im, tmp_path / "i.dat")
    data = (tmp_path / "i.dat").read_bytes()
    assert data.endswith(struct.pack("<ii", 2, 0)) and data == _legacy_by_hand(im)
    assert load_imatrix(tmp_path / "i.dat").datasets == []


def test_legacy_without_trailer_loads(tmp_path: Path) -> None:
    body = struct.pack("<i", 1) + struct.pack("<i", 3) + b"abc" + struct.pack("<ii", 4, 2) + struct.pack("<2f", 8, 2)
    (tmp_path / "old.dat").write_bytes(body)
    im = load_imatrix(tmp_path / "old.dat")
    assert im.chunk_count == 0 and im.datasets == []
    np.testing.assert_array_equal(im.values("abc"), np.array([2.0, 0.5], np.float32))


# ------------------------------------------------------------------------------------------ GGUF layout


def test_gguf_keys_tensors_types(tmp_path: Path) -> None:
    im = _sample()
    save_imatrix_gguf(im, tmp_path / "i.gguf")
    r = GGUFReader(tmp_path / "i.gguf")
    fields = {k: f for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert list(fields) == ["general.type", "imatrix.datasets", "imatrix.chunk_count", "imatrix.chunk_size"]
    assert fields["general.type"].types == [GGUFValueType.STRING]
    assert fields["general.type"].contents() == "imatrix"
    assert fields["imatrix.datasets"].types == [GGUFValueType.ARRAY, GGUFValueType.STRING]
    assert fields["imatrix.datasets"].contents() == im.datasets
    assert fields["imatrix.chunk_count"].types == [GGUFValueType.UINT32]
    assert fields["imatrix.chunk_size"].types == [GGUFValueType.UINT32]
    assert (fields["imatrix.chunk_count"].contents(), fields["imatrix.chunk_size"].contents()) == (2, 128)
    names = sorted(im.entries, key=str.encode)
    assert [t.name for t in r.tensors] == [n + s for n in names for s in (".in_sum2", ".counts")]
    shapes = {t.name: (list(map(int, t.shape)), t.tensor_type) for t in r.tensors}
    f32 = GGMLQuantizationType.F32
    assert shapes["blk.0.attn_q.weight.in_sum2"] == ([64], f32)  # ggml_n_dims drops the trailing 1
    assert shapes["blk.0.attn_q.weight.counts"] == ([1], f32)
    assert shapes["blk.0.ffn_up_exps.weight.in_sum2"] == ([16, 4], f32)
    assert shapes["blk.0.ffn_up_exps.weight.counts"] == ([1, 4], f32)
    assert r.alignment == 32 and r.data_offset % 32 == 0


def test_gguf_empty_datasets_array(tmp_path: Path) -> None:
    im = _sample()
    im.datasets = []
    save_imatrix_gguf(im, tmp_path / "i.gguf")
    key = b"imatrix.datasets"
    raw = (tmp_path / "i.gguf").read_bytes()
    at = raw.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<IIQ", raw, at) == (GGUFValueType.ARRAY, GGUFValueType.STRING, 0)
    assert load_imatrix(tmp_path / "i.gguf").datasets == []


def _c_save_imatrix(lib: ctypes.CDLL, im: Imatrix, path: Path) -> None:
    """IMatrixCollector::save_imatrix replayed through ggml's own gguf writer (libggml-base via ctypes)."""
    class InitParams(ctypes.Structure):
        _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]

    vp, cp = ctypes.c_void_p, ctypes.c_char_p
    lib.ggml_init.restype, lib.ggml_init.argtypes = vp, [InitParams]
    lib.gguf_init_empty.restype = vp
    lib.gguf_set_val_str.argtypes = [vp, cp, cp]
    lib.gguf_set_arr_str.argtypes = [vp, cp, ctypes.POINTER(cp), ctypes.c_size_t]
    lib.gguf_set_val_u32.argtypes = [vp, cp, ctypes.c_uint32]
    lib.ggml_new_tensor_2d.restype, lib.ggml_new_tensor_2d.argtypes = vp, [vp, ctypes.c_int, ctypes.c_int64,
                                                                            ctypes.c_int64]
    lib.ggml_set_name.restype, lib.ggml_set_name.argtypes = vp, [vp, cp]
    lib.ggml_get_data.restype, lib.ggml_get_data.argtypes = vp, [vp]
    lib.gguf_add_tensor.argtypes = [vp, vp]
    lib.gguf_write_to_file.restype, lib.gguf_write_to_file.argtypes = ctypes.c_bool, [vp, cp, ctypes.c_bool]
    lib.gguf_free.argtypes = [vp]
    lib.ggml_free.argtypes = [vp]

    ctx = lib.ggml_init(InitParams(64 << 20, None, False))
    g = lib.gguf_init_empty()
    lib.gguf_set_val_str(g, b"general.type", b"imatrix")
    ds = (cp * max(1, len(im.datasets)))(*[d.encode() for d in im.datasets])
    lib.gguf_set_arr_str(g, b"imatrix.datasets", ds, len(im.datasets))
    lib.gguf_set_val_u32(g, b"imatrix.chunk_count", im.chunk_count)
    lib.gguf_set_val_u32(g, b"imatrix.chunk_size", im.chunk_size)
    for name in sorted(im.entries, key=str.encode):
        e = im.entries[name]
        nval, nmat = e.sums.size, e.counts.size
        for suffix, ne0, data in ((".in_sum2", nval // nmat, e.sums), (".counts", 1, e.counts)):
            t = lib.ggml_new_tensor_2d(ctx, int(GGMLQuantizationType.F32), ne0, nmat)
            lib.ggml_set_name(t, (name + suffix).encode())
            arr = np.ascontiguousarray(data, np.float32)
            ctypes.memmove(lib.ggml_get_data(t), arr.ctypes.data, arr.nbytes)
            lib.gguf_add_tensor(g, t)
    assert lib.gguf_write_to_file(g, str(path).encode(), False)
    lib.gguf_free(g)
    lib.ggml_free(ctx)


@pytest.mark.oracle
@pytest.mark.parametrize("datasets", [["wiki.train.raw", "calib/more.txt"], []])
def test_gguf_bytes_equal_ggml_writer(tmp_path: Path, require_oracle, datasets) -> None:
    im = _sample()
    im.datasets = datasets
    save_imatrix_gguf(im, tmp_path / "ours.gguf")
    _c_save_imatrix(require_oracle._lib(), im, tmp_path / "ggml.gguf")
    assert (tmp_path / "ours.gguf").read_bytes() == (tmp_path / "ggml.gguf").read_bytes()


# ------------------------------------------------------------------------------------------ values()


def test_values_gguf_matches_c_derivation() -> None:
    im = _sample()
    for name, e in im.entries.items():
        np.testing.assert_array_equal(im.values(name), _values_c(e.sums, e.counts, False))
    assert np.all(im.values("blk.1.ffn_down.weight") == 1.0)  # count 0 -> 1.0
    moe = im.values("blk.0.ffn_up_exps.weight").reshape(4, 16)
    assert np.all(moe[1] == 1.0) and not np.all(moe[0] == 1.0)
    assert im.values("blk.9.missing.weight") is None


def test_values_rounds_counts_like_lround() -> None:
    im = Imatrix({"w": ImatrixEntry(np.array([10.0, 10.0], np.float32), np.array([2.5, 0.4], np.float32))},
                 ["d"], 1, 1)
    np.testing.assert_array_equal(im.values("w"), np.array([10 / np.float32(3), 1.0], np.float32))


def test_values_legacy_divides_by_ncall(tmp_path: Path) -> None:
    im = _sample()
    save_imatrix_legacy(im, tmp_path / "i.dat")
    lg = load_imatrix(tmp_path / "i.dat")
    for name, e in lg.entries.items():
        np.testing.assert_array_equal(lg.values(name), _values_c(e.sums, e.counts, True))
    # legacy stores (sum/count)*ncall, so values come back close to sum/count
    np.testing.assert_allclose(lg.values("blk.0.attn_q.weight"), im.values("blk.0.attn_q.weight"), rtol=1e-6)


def test_legacy_to_raw_then_gguf(tmp_path: Path) -> None:
    save_imatrix_legacy(_sample(), tmp_path / "i.dat")
    raw = legacy_to_raw(load_imatrix(tmp_path / "i.dat"), 512)
    e = raw.entries["blk.0.ffn_up_exps.weight"]
    assert e.counts.tolist() == [512.0]  # ncall = ceil(120/128) = 1, times chunk_size
    assert raw.chunk_size == 512 and raw.chunk_count == 3  # m_last_chunk = max count (ceil(300/128)*512) / 512
    save_imatrix_gguf(raw, tmp_path / "i.gguf")
    assert load_imatrix(tmp_path / "i.gguf").entries.keys() == raw.entries.keys()
    with pytest.raises(GGUFFormatError, match="legacy_to_raw"):
        save_imatrix_gguf(load_imatrix(tmp_path / "i.dat"), tmp_path / "x.gguf")


# ------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [np.nan, np.inf, -1.0])
def test_rejects_non_finite_or_negative(tmp_path: Path, bad: float) -> None:
    im = _sample()
    im.entries["blk.0.attn_q.weight"].sums[3] = bad
    with pytest.raises(GGUFFormatError):
        save_imatrix_gguf(im, tmp_path / "i.gguf")
    with pytest.raises(CheckpointError):
        save_imatrix_legacy(im, tmp_path / "i.dat")
    assert list(tmp_path.iterdir()) == []


def test_rejects_bad_shapes_and_names(tmp_path: Path) -> None:
    base = _sample()
    for entries in (
        {"w": ImatrixEntry(np.ones(5, np.float32), np.ones(2, np.float32))},  # 5 sums over 2 experts
        {"w": ImatrixEntry(np.ones(4, np.float32), np.zeros(0, np.float32))},
        {"blk.0." + "x" * 50 + ".weight": ImatrixEntry(np.ones(4, np.float32), np.ones(1, np.float32))},
        {},
    ):
        with pytest.raises(GGUFFormatError):
            save_imatrix_gguf(Imatrix(entries, base.datasets, 1, 1), tmp_path / "i.gguf")


def _good_files(tmp_path: Path) -> tuple[bytes, bytes]:
    save_imatrix_gguf(_sample(), tmp_path / "g.gguf")
    save_imatrix_legacy(_sample(), tmp_path / "l.dat")
    return (tmp_path / "g.gguf").read_bytes(), (tmp_path / "l.dat").read_bytes()


def test_truncated_files_give_clear_errors(tmp_path: Path) -> None:
    g, legacy = _good_files(tmp_path)
    p = tmp_path / "t"
    for cut in (5, 30, 100, len(g) // 2, len(g) - 1):
        p.write_bytes(g[:cut])
        with pytest.raises(GGUFFormatError, match="truncated|corrupt"):
            load_imatrix(p)
    trailer = 8 + len(b"calib/more.txt")
    for cut in (0, 3, 9, 40, len(legacy) - trailer - 1, len(legacy) - trailer + 2, len(legacy) - 3):
        p.write_bytes(legacy[:cut])
        with pytest.raises(CheckpointError):
            load_imatrix(p)


def test_lying_lengths_do_not_allocate(tmp_path: Path) -> None:
    p = tmp_path / "lie"
    # legacy: one entry whose nval claims 2^31-1 floats
    p.write_bytes(struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 1, 2**31 - 1) + b"\0" * 16)
    with pytest.raises(CheckpointError, match="truncated"):
        load_imatrix(p)
    p.write_bytes(struct.pack("<ii", 2**31 - 1, 1) + b"w" + struct.pack("<ii", 1, 1) + b"\0" * 4)
    with pytest.raises(CheckpointError, match="truncated"):
        load_imatrix(p)
    # GGUF: a string claiming 2^40 bytes, a string array claiming 2^29 elements, a 2^62 tensor count
    p.write_bytes(b"GGUF" + struct.pack("<Iqq", 3, 0, 1) + struct.pack("<Q", 2**40) + b"k")
    with pytest.raises(GGUFFormatError, match="exceeds|truncated"):
        load_imatrix(p)
    p.write_bytes(b"GGUF" + struct.pack("<Iqq", 3, 0, 1) + struct.pack("<Q", 1) + b"k"
                  + struct.pack("<IIQ", 9, 8, 2**29))
    with pytest.raises(GGUFFormatError, match="more than the file"):
        load_imatrix(p)
    p.write_bytes(b"GGUF" + struct.pack("<Iqq", 3, 2**62, 0))
    with pytest.raises(GGUFFormatError, match="truncated"):
        load_imatrix(p)


def test_corrupt_gguf_structure(tmp_path: Path) -> None:
    g, _ = _good_files(tmp_path)
    p = tmp_path / "c.gguf"
    p.write_bytes(g[:4] + struct.pack("<I", 1) + g[8:])
    with pytest.raises(GGUFFormatError, match="version"):
        load_imatrix(p)
    # counts tensor type F32 (0) -> F16 (1): the imatrix loader demands F32
    bad = bytearray(g)
    name = b"blk.0.attn_q.weight.counts"
    at = bad.index(name) + len(name) + 4 + 8  # name, n_dims, ne[0]
    assert struct.unpack_from("<i", bad, at)[0] == 0
    struct.pack_into("<i", bad, at, 1)
    p.write_bytes(bytes(bad))
    with pytest.raises(GGUFFormatError):
        load_imatrix(p)
    # rename a counts tensor: its sums are left without a partner
    bad = bytearray(g)
    at = bad.index(b"blk.0.attn_q.weight.counts")
    bad[at + len("blk.0.attn_q.weight.")] = ord("k")
    p.write_bytes(bytes(bad))
    with pytest.raises(GGUFFormatError, match="mismatched sums and counts"):
        load_imatrix(p)


def test_gguf_without_imatrix_metadata_is_refused(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(tmp_path / "m.gguf", "llama")
    w.add_tensor("w.in_sum2", np.ones(4, np.float32))
    w.add_tensor("w.counts", np.ones(1, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(GGUFFormatError, match="missing imatrix metadata"):
        load_imatrix(tmp_path / "m.gguf")


def test_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot read"):
        load_imatrix(tmp_path / "nope.dat")
    (tmp_path / "e.dat").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_imatrix(tmp_path / "e.dat")
    (tmp_path / "z.dat").write_bytes(struct.pack("<i", 0))
    with pytest.raises(CheckpointError, match="no data"):
        load_imatrix(tmp_path / "z.dat")


def test_legacy_ncall_zero_keeps_raw_values(tmp_path: Path) -> None:
    body = struct.pack("<ii", 1, 1) + b"w" + struct.pack("<ii", 0, 3) + struct.pack("<3f", 1.5, 0.0, 7.0)
    (tmp_path / "z.dat").write_bytes(body + struct.pack("<ii", 0, 0))
    np.testing.assert_array_equal(load_imatrix(tmp_path / "z.dat").values("w"), np.array([1.5, 0, 7], np.float32))


def test_gguf_ignores_unrelated_tensors(tmp_path: Path) -> None:
    from gguf import GGUFWriter

    w = GGUFWriter(tmp_path / "m.gguf", "llama")
    for key, val, vt in (("imatrix.chunk_count", 3, GGUFValueType.UINT32),
                         ("imatrix.chunk_size", 512, GGUFValueType.UINT32)):
        w.add_key_value(key, val, vt)
    w.add_array("imatrix.datasets", ["a"])
    w.add_tensor("w.in_sum2", np.array([2, 4, 6, 8], np.float32).reshape(2, 2))
    w.add_tensor("w.counts", np.array([[2], [0]], np.float32))
    w.add_tensor("token_embd.weight", np.zeros((2, 2), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    im = load_imatrix(tmp_path / "m.gguf")
    assert list(im.entries) == ["w"] and im.datasets == ["a"]
    np.testing.assert_array_equal(im.values("w"), np.array([1, 2, 1, 1], np.float32))
