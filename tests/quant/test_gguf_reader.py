"""read_gguf: a safe parser. Malformed input -> GGUFFormatError (never a hang, crash or huge allocation)."""
from __future__ import annotations

import ctypes
import struct

import numpy as np
import pytest
from gguf.constants import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core.errors import GGUFFormatError
from quant.gguf_kv import KV
from quant.gguf_reader import GGML_TYPES, ggml_type, read_gguf
from quant.gguf_writer import TensorSpec, write_gguf

pytestmark = pytest.mark.timeout(60)


# ---- a raw builder, so every field can lie -------------------------------------------------------------
def s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def kv_u32(key: str, v: int) -> bytes:
    return s(key) + struct.pack("<II", V.UINT32, v)


def kv_str(key: str, v: str) -> bytes:
    return s(key) + struct.pack("<I", V.STRING) + s(v)


def ti(name: str | bytes, ne: list[int], type_id: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<q", d) for d in ne) + struct.pack("<iQ", type_id, offset)


def gguf_bytes(kvs: list[bytes], tis: list[bytes], data: bytes = b"", *, version: int = 3,
               n_tensors: int | None = None, n_kv: int | None = None, alignment: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    meta = head + b"".join(kvs) + b"".join(tis)
    if tis:
        meta += bytes(-len(meta) % alignment)
    return meta + data


ARCH = kv_str("general.architecture", "llama")
F32_64 = np.arange(64, dtype=np.float32).tobytes()        # 256 bytes, a multiple of 32: no padding needed


def good() -> bytes:
    return gguf_bytes([ARCH], [ti("a", [64], 0, 0), ti("b", [32, 2], 0, 256)], F32_64 + F32_64)


def write(tmp_path, data: bytes, name="f.gguf"):
    p = tmp_path / name
    p.write_bytes(data)
    return p


# ---- valid files ---------------------------------------------------------------------------------------
def test_parses_valid_file(tmp_path):
    g = read_gguf(write(tmp_path, good()))
    assert g.version == 3 and g.alignment == 32 and g.file_size == len(good())
    assert g.kv == [KV("general.architecture", "llama", V.STRING)]
    a, b = g.tensors
    assert (a.name, a.shape, a.qtype, a.ggml_type, a.nbytes) == ("a", (64,), "F32", 0, 256)
    assert b.shape == (2, 32) and b.offset == a.offset + 256 == g.data_offset + 256
    data = g.tensor_data("b")
    assert not data.flags.owndata and not data.flags.writeable          # a view of the mapping, no copy
    np.testing.assert_array_equal(data.view(np.float32), np.arange(64, dtype=np.float32))
    g.close()                                                             # views still alive: must not raise
    assert data.view(np.float32)[3] == 3.0


def test_version_2_is_accepted(tmp_path):
    g = read_gguf(write(tmp_path, good()[:4] + struct.pack("<I", 2) + good()[8:]))
    assert g.version == 2 and len(g.tensors) == 2
    g.close()


def test_invalid_utf8_round_trips(tmp_path):
    kv = s(b"k.\xff") + struct.pack("<I", V.STRING) + s(b"\xc3(")
    g = read_gguf(write(tmp_path, gguf_bytes([ARCH, kv], [])))
    k = g.kv[1]
    assert k.key.encode("utf-8", "surrogateescape") == b"k.\xff"
    assert k.value.encode("utf-8", "surrogateescape") == b"\xc3("
    g.close()


def test_ggml_type_table_matches_pinned_ggml():
    assert ggml_type("q8_0").block_size == 32 and ggml_type(8).type_size == 34
    assert ggml_type("Q2_0") is not None                                  # pinned ggml.h has Q2_0 = 42
    assert ggml_type(4) is None and ggml_type(31) is None                 # removed types
    assert max(GGML_TYPES) == 42


# ---- malformed files -----------------------------------------------------------------------------------
def test_every_truncation_is_refused(tmp_path):
    full = good()
    p = tmp_path / "t.gguf"
    for n in range(len(full)):
        p.write_bytes(full[:n])
        with pytest.raises(GGUFFormatError):
            read_gguf(p).close()


@pytest.mark.parametrize(
    "data, msg",
    [
        (b"GGML" + good()[4:], "not a GGUF file"),
        (b"\x00" * 40, "not a GGUF file"),
        (good()[:4] + struct.pack("<I", 1) + good()[8:], "v1 is no longer supported"),
        (good()[:4] + struct.pack("<I", 0) + good()[8:], "unsupported GGUF version 0"),
        (good()[:4] + struct.pack("<I", 4) + good()[8:], "unsupported GGUF version 4"),
        (good()[:4] + struct.pack(">I", 3) + good()[8:], "big-endian"),
        (gguf_bytes([ARCH], [], n_kv=2**60), "cannot fit"),
        (gguf_bytes([ARCH], [], n_tensors=2**60), "cannot fit"),
        (gguf_bytes([ARCH], [], n_tensors=2**64 - 1), "cannot fit"),
        (gguf_bytes([struct.pack("<Q", 2**62) + b"key" + bytes(64)], []), "claims a length"),
        (gguf_bytes([s("k") + struct.pack("<IIQ", V.ARRAY, V.UINT8, 2**60)], []), "claims 1152921504606846976 array elements"),
        (gguf_bytes([s("k") + struct.pack("<IIQ", V.ARRAY, V.STRING, 2**40)], []), "array elements"),
        (gguf_bytes([s("k") + struct.pack("<IIQ", V.ARRAY, V.STRING, 1) + struct.pack("<Q", 2**50)], []), "claims a length"),
        (gguf_bytes([s("k") + struct.pack("<IIQ", V.ARRAY, V.ARRAY, 1)], []), "array of arrays"),
        (gguf_bytes([s("k") + struct.pack("<II", 13, 0)], []), "invalid GGUF value type 13"),
        (gguf_bytes([ARCH], [ti("a", [64, 1, 1, 1, 1], 0, 0)], F32_64), "at most 4"),
        (gguf_bytes([ARCH], [s("a") + struct.pack("<I", 2**31)], F32_64), "at most 4"),
    ],
)
def test_fatal_corruption(tmp_path, data, msg):
    p = write(tmp_path, data)
    with pytest.raises(GGUFFormatError, match=msg):
        read_gguf(p)
    with pytest.raises(GGUFFormatError, match=msg):
        read_gguf(p, strict=False)


SPEC_VIOLATIONS = [
    (gguf_bytes([ARCH, ARCH], []), "duplicate key 'general.architecture'"),
    (gguf_bytes([ARCH, kv_u32("", 1)], []), "empty key"),
    (gguf_bytes([ARCH], [ti("a", [64], 0, 0), ti("a", [64], 0, 256)], F32_64 * 2), "duplicate tensor name 'a'"),
    (gguf_bytes([ARCH], [ti("x" * 64, [64], 0, 0)], F32_64), "at most 63"),
    (gguf_bytes([ARCH], [ti("a", [64], 99, 0)], F32_64), "unknown ggml type id 99"),
    (gguf_bytes([ARCH], [ti("a", [64], 4, 0)], F32_64), "unknown ggml type id 4"),
    (gguf_bytes([ARCH], [ti("a", [-64], 0, 0)], F32_64), "negative dimension"),
    (gguf_bytes([ARCH], [ti("a", [2**62, 2**62], 0, 0)], F32_64), "too many elements"),
    (gguf_bytes([ARCH], [ti("a", [48], 8, 0)], F32_64), "not a multiple of the block size 32"),
    (gguf_bytes([ARCH], [ti("a", [64], 0, 16)], F32_64 + bytes(32)), "not a multiple of the alignment"),
    (gguf_bytes([ARCH], [ti("a", [64], 0, 0), ti("b", [64], 0, 128)], F32_64 * 2), "overlap"),
    (gguf_bytes([ARCH], [ti("a", [64], 0, 0), ti("b", [64], 0, 512)], F32_64 * 3), "not contiguous"),
    (gguf_bytes([ARCH], [ti("a", [64], 0, 0), ti("b", [64], 0, 256)], F32_64), "beyond the end of the file"),
    (gguf_bytes([ARCH], [ti("a", [64], 0, 2**63)], F32_64), "beyond the end of the file"),
    (gguf_bytes([ARCH, s("general.alignment") + struct.pack("<IQ", V.UINT64, 32)], []), "must be of type UINT32"),
    (gguf_bytes([ARCH, kv_u32("general.alignment", 48)], []), "not a power of 2"),
]


@pytest.mark.parametrize("data, msg", SPEC_VIOLATIONS)
def test_spec_violations(tmp_path, data, msg):
    p = write(tmp_path, data)
    with pytest.raises(GGUFFormatError, match=msg):
        read_gguf(p)
    g = read_gguf(p, strict=False)
    assert any(msg in problem for problem in g.problems), g.problems
    g.close()


def test_unknown_type_is_named_in_lenient_mode(tmp_path):
    g = read_gguf(write(tmp_path, gguf_bytes([ARCH], [ti("a", [64], 99, 0)], F32_64)), strict=False)
    assert g.tensors[0].qtype == "UNKNOWN(99)" and g.tensors[0].ggml_type == 99
    g.close()


def test_custom_alignment_is_used(tmp_path):
    data = gguf_bytes([ARCH, kv_u32("general.alignment", 128)], [ti("a", [64], 0, 0), ti("b", [64], 0, 256)],
                      F32_64 * 2, alignment=128)
    g = read_gguf(write(tmp_path, data))
    assert g.alignment == 128 and g.data_offset % 128 == 0
    g.close()
    # valid with the default alignment 32, misaligned with 128
    misaligned = gguf_bytes([ARCH, kv_u32("general.alignment", 128)], [ti("a", [16], 0, 0), ti("b", [16], 0, 64)],
                            F32_64, alignment=128)
    with pytest.raises(GGUFFormatError, match="alignment 128"):
        read_gguf(write(tmp_path, misaligned))


def test_lists_all_problems(tmp_path):
    data = gguf_bytes([ARCH, ARCH], [ti("a", [64], 99, 0), ti("a", [64], 0, 16)], F32_64 * 2)
    g = read_gguf(write(tmp_path, data), strict=False)
    assert len(g.problems) >= 3
    g.close()
    with pytest.raises(GGUFFormatError, match="duplicate key.*unknown ggml type.*duplicate tensor name"):
        read_gguf(write(tmp_path, data))


def test_missing_file(tmp_path):
    with pytest.raises(GGUFFormatError, match="cannot open"):
        read_gguf(tmp_path / "nope.gguf")


def test_reads_writer_output_with_quantized_tensor(tmp_path):
    import quant

    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    q = quant.quantize(x, "Q4_0")
    write_gguf(tmp_path / "q.gguf", kv=[KV("general.architecture", "llama", V.STRING)],
               tensors=[TensorSpec("w", (2, 64), "Q4_0", lambda: q)])
    with read_gguf(tmp_path / "q.gguf") as g:
        t = g.tensor("w")
        assert (t.qtype, t.shape, t.nbytes) == ("Q4_0", (2, 64), 2 * 2 * 18)
        assert bytes(g.tensor_data("w")) == q.tobytes()


# ---- ggml's own gguf reader as the oracle ----------------------------------------------------------------
class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def ggml_gguf_lib(oracle) -> ctypes.CDLL:
    """libggml-base's gguf_* API through ctypes (the same code llama.cpp loads and writes GGUF with)."""
    lib = ctypes.CDLL(str(oracle.ggml_lib_path()))
    sig = {
        "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _InitParams]),
        "gguf_free": (None, [ctypes.c_void_p]),
        "gguf_get_version": (ctypes.c_uint32, [ctypes.c_void_p]),
        "gguf_get_alignment": (ctypes.c_size_t, [ctypes.c_void_p]),
        "gguf_get_data_offset": (ctypes.c_size_t, [ctypes.c_void_p]),
        "gguf_get_n_kv": (ctypes.c_int64, [ctypes.c_void_p]),
        "gguf_get_key": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
        "gguf_get_tensor_name": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_offset": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_size": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_tensor_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_write_to_file": (ctypes.c_bool, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]),
    }
    for name, (res, args) in sig.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


def ggml_open(lib, path):
    """gguf_init_from_file with no_alloc (as llama.cpp's model loader does); None when ggml refuses the file."""
    ctx = lib.gguf_init_from_file(str(path).encode(), _InitParams(True, None))
    return ctx or None


def _ggml_accepts(lib, path) -> bool:
    """ggml parses the header AND every tensor's data lies inside the file (llama.cpp's loader checks that)."""
    ctx = ggml_open(lib, path)
    if ctx is None:
        return False
    try:
        size = path.stat().st_size
        base = lib.gguf_get_data_offset(ctx)
        return all(
            base + lib.gguf_get_tensor_offset(ctx, i) + lib.gguf_get_tensor_size(ctx, i) <= size
            for i in range(lib.gguf_get_n_tensors(ctx))
        )
    finally:
        lib.gguf_free(ctx)


@pytest.mark.oracle
def test_ggml_agrees_on_valid_and_invalid_files(tmp_path, require_oracle):
    lib = ggml_gguf_lib(require_oracle)
    cases = [good(), good()[:4] + struct.pack("<I", 2) + good()[8:]]
    cases += [d for d, _ in SPEC_VIOLATIONS] + [good()[:n] for n in range(0, len(good()), 7)]
    for i, data in enumerate(cases):
        p = write(tmp_path, data, f"c{i}.gguf")
        try:
            read_gguf(p).close()
            ours = True
        except GGUFFormatError:
            ours = False
        assert ours == _ggml_accepts(lib, p), (i, data[:64])


@pytest.mark.oracle
def test_ggml_reads_our_layout(tmp_path, require_oracle):
    lib = ggml_gguf_lib(require_oracle)
    p = write(tmp_path, gguf_bytes([ARCH, kv_u32("general.alignment", 64)],
                                   [ti("a", [64], 0, 0), ti("b", [32, 2], 0, 256)], F32_64 * 2, alignment=64))
    ctx = ggml_open(lib, p)
    assert ctx
    try:
        with read_gguf(p) as g:
            assert lib.gguf_get_version(ctx) == g.version and lib.gguf_get_alignment(ctx) == g.alignment == 64
            assert lib.gguf_get_data_offset(ctx) == g.data_offset
            assert [lib.gguf_get_key(ctx, i).decode() for i in range(lib.gguf_get_n_kv(ctx))] == [k.key for k in g.kv]
            for i, t in enumerate(g.tensors):
                assert lib.gguf_get_tensor_name(ctx, i).decode() == t.name
                assert g.data_offset + lib.gguf_get_tensor_offset(ctx, i) == t.offset
                assert lib.gguf_get_tensor_size(ctx, i) == t.nbytes
                assert lib.gguf_get_tensor_type(ctx, i) == t.ggml_type
    finally:
        lib.gguf_free(ctx)


@pytest.mark.oracle
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 200), st.integers(1, 255)), min_size=1, max_size=4))
def test_ggml_agrees_on_fuzzed_headers(tmp_path, require_oracle, flips):
    lib = ggml_gguf_lib(require_oracle)
    base = gguf_bytes([ARCH, kv_u32("n", 7), s("arr") + struct.pack("<IIQ", V.ARRAY, V.INT16, 3) + bytes(6)],
                      [ti("a", [64], 0, 0), ti("b", [32, 2], 0, 256)], F32_64 * 2)
    data = bytearray(base)
    for pos, x in flips:
        data[pos % len(data)] ^= x
    p = write(tmp_path, bytes(data), "fz.gguf")
    try:
        read_gguf(p).close()
        ours = True
    except GGUFFormatError:
        ours = False
    assert ours == _ggml_accepts(lib, p)
