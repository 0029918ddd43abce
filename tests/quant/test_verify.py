"""verify_gguf: lists every problem of a GGUF file, never raises on bad input."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from gguf.constants import GGUFValueType as V
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import quant
from core.errors import GGUFFormatError
from quant.gguf_kv import KV
from quant.gguf_reader import read_gguf
from quant.gguf_writer import TensorSpec, write_gguf
from quant.verify import VerifyReport, verify_gguf
from tests.quant.test_gguf_reader import ARCH, F32_64, gguf_bytes, kv_str, kv_u32, s, ti

pytestmark = pytest.mark.timeout(120)
RNG = np.random.default_rng(7)
META = [  # an architecture without required tensors: llama / qwen2 completeness is tested in tests/security
    KV("general.architecture", "quantgate-generic", V.STRING),
    KV("general.file_type", 7, V.UINT32),                 # MOSTLY_Q8_0
    KV("general.quantization_version", 2, V.UINT32),
]


def _specs(f16: np.ndarray | None = None, f32: np.ndarray | None = None, q8: np.ndarray | None = None):
    f16 = RNG.standard_normal((2, 32)).astype(np.float16) if f16 is None else f16
    f32 = RNG.standard_normal(36).astype(np.float32) if f32 is None else f32       # 144 bytes: padded
    q8 = quant.quantize(RNG.standard_normal((2, 64)).astype(np.float32), "Q8_0") if q8 is None else q8
    return [
        TensorSpec("f16.weight", f16.shape, "F16", lambda: f16.view(np.uint8)),
        TensorSpec("norm.weight", f32.shape, "F32", lambda: f32.view(np.uint8)),
        TensorSpec("q8.weight", (2, 64), "Q8_0", lambda: q8),
    ]


def _write(tmp_path, kv=META, specs=None, name="m.gguf"):
    p = tmp_path / name
    write_gguf(p, kv=kv, tensors=specs if specs is not None else _specs())
    return p


def test_valid_file_is_ok(tmp_path):
    r = verify_gguf(_write(tmp_path))
    assert r.ok and r.problems == [] and r.n_tensors == 3
    assert r.file_size == (tmp_path / "m.gguf").stat().st_size


def test_nan_and_inf_in_float_data_are_reported(tmp_path):
    f16 = RNG.standard_normal((2, 32)).astype(np.float16)
    f16[0, 3], f16[1, 0] = np.nan, -np.inf
    f32 = RNG.standard_normal(36).astype(np.float32)
    f32[[5, 6, 7]] = np.nan
    r = verify_gguf(_write(tmp_path, specs=_specs(f16=f16, f32=f32)))
    assert not r.ok
    assert "tensor 'f16.weight' (F16) has 1 NaN and 1 Inf values (first at flat index 3)" in r.problems
    assert "tensor 'norm.weight' (F32) has 3 NaN and 0 Inf values (first at flat index 5)" in r.problems
    assert verify_gguf(tmp_path / "m.gguf", check_values=False).ok


def test_bf16_inf_is_reported(tmp_path):
    x = np.array([1.0, np.inf] + [0.0] * 30, np.float32)
    raw = (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    p = _write(tmp_path, kv=META[:1], specs=[TensorSpec("b", (32,), "BF16", lambda: raw)])
    assert verify_gguf(p).problems == ["tensor 'b' (BF16) has 0 NaN and 1 Inf values (first at flat index 1)"]


def test_nan_scale_in_quantized_block_is_reported(tmp_path):
    q8 = quant.quantize(RNG.standard_normal((2, 64)).astype(np.float32), "Q8_0").copy()
    q8[1, 34:36] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)   # scale of row 1, block 1
    r = verify_gguf(_write(tmp_path, specs=_specs(q8=q8)))
    assert r.problems == ["tensor 'q8.weight' (Q8_0) has 32 NaN and 0 Inf values (first at flat index 96)"]


def test_other_types_get_a_note_not_a_problem(tmp_path):
    ints = np.arange(32, dtype=np.int32)
    p = _write(tmp_path, kv=META[:1], specs=[TensorSpec("pos", (32,), "I32", lambda: ints.view(np.uint8))])
    r = verify_gguf(p)
    assert r.ok and "cannot check values of type I32 (tensor 'pos')" in r.notes


def test_metadata_problems(tmp_path):
    r = verify_gguf(_write(tmp_path, kv=[]))
    assert "general.architecture is missing" in r.problems
    assert "general.file_type is missing (optional)" in r.notes     # optional in the GGUF spec
    assert "general.quantization_version is missing but the file has quantized tensors" in r.problems
    bad = [META[0], KV("general.file_type", 0, V.UINT32), KV("general.quantization_version", 1, V.UINT32)]
    r = verify_gguf(_write(tmp_path, kv=bad, name="b.gguf"))
    assert "general.file_type is ALL_F32 but tensor 'f16.weight' is F16" in r.problems
    assert "general.file_type is ALL_F32 but tensor 'q8.weight' is Q8_0" in r.problems
    assert any("quantization_version must be UINT32 2" in p for p in r.problems)
    r = verify_gguf(_write(tmp_path, kv=[META[0], KV("general.file_type", 5, V.UINT32)], name="c.gguf"))
    assert "general.file_type = 5 is not a known llama_ftype" in r.problems
    r = verify_gguf(_write(tmp_path, kv=[META[0], KV("general.file_type", 1, V.INT32)], name="d.gguf"))
    assert any("general.file_type must be UINT32" in p for p in r.problems)


def test_every_problem_is_listed(tmp_path):
    """Duplicate key, duplicate name, unknown type, misaligned, overlapping, out of bounds, NaN: all reported."""
    nan = np.full(64, np.nan, np.float32).tobytes()
    data = gguf_bytes(
        [ARCH, ARCH],
        [ti("a", [64], 0, 0), ti("a", [64], 0, 256), ti("u", [64], 99, 512), ti("m", [64], 0, 16),
         ti("x" * 70, [64], 0, 1024), ti("n", [64], 0, 768)],
        F32_64 + F32_64 + F32_64 + nan,
    )
    p = tmp_path / "bad.gguf"
    p.write_bytes(data)
    r = verify_gguf(p)
    text = "\n".join(r.problems)
    for needle in ["duplicate key 'general.architecture'", "duplicate tensor name 'a'", "unknown ggml type id 99",
                   "'m' data offset 16 is not a multiple of the alignment", "overlap", "is 70 bytes long",
                   "beyond the end of the file", "tensor 'n' (F32) has 64 NaN"]:
        assert needle in text, needle
    assert not r.ok and r.n_tensors == 6


def test_nonzero_padding_is_a_problem(tmp_path):
    p = _write(tmp_path)
    with read_gguf(p) as g:
        t = g.tensor("norm.weight")
        pos = t.offset + t.nbytes
    data = bytearray(p.read_bytes())
    data[pos] = 1
    p.write_bytes(bytes(data))
    assert verify_gguf(p).problems == ["padding after tensor 'norm.weight' is not all zero"]


def test_fatal_errors_become_a_problem(tmp_path):
    p = _write(tmp_path)
    full = p.read_bytes()
    for cut in (0, 3, 10, 30, 100, len(full) - 30, len(full) - 1):
        p.write_bytes(full[:cut])
        r = verify_gguf(p)
        assert isinstance(r, VerifyReport) and not r.ok and len(r.problems) >= 1
    assert verify_gguf(tmp_path / "missing.gguf").problems[0].startswith("cannot open")
    q = tmp_path / "lie.gguf"
    q.write_bytes(gguf_bytes([ARCH], [], n_kv=2**60))
    assert "cannot fit" in verify_gguf(q).problems[0]


def test_extra_trailing_bytes_are_a_note(tmp_path):
    p = _write(tmp_path)
    p.write_bytes(p.read_bytes() + b"\x00" * 7)
    r = verify_gguf(p)
    assert r.ok and "7 extra bytes after the tensor data" in r.notes


def test_custom_alignment_and_version_2(tmp_path):
    data = gguf_bytes([kv_str("general.architecture", "quantgate-generic"), kv_u32("general.alignment", 64), s("z") + struct.pack("<IB", V.UINT8, 1)],
                      [ti("a", [64], 0, 0)], F32_64, version=2, alignment=64)
    p = tmp_path / "v2.gguf"
    p.write_bytes(data)
    r = verify_gguf(p)
    assert r.ok and "GGUF version 2 (quantgate writes version 3)" in r.notes


_FUZZ_BASE: dict[str, bytes] = {}


def _fuzz_base(tmp_dir) -> bytes:
    if "b" not in _FUZZ_BASE:
        f16 = np.linspace(-1, 1, 64).astype(np.float16).reshape(2, 32)
        f32 = np.linspace(-2, 2, 36).astype(np.float32)
        q8 = quant.quantize(np.linspace(-3, 3, 128).astype(np.float32).reshape(2, 64), "Q8_0")
        kv = META + [KV("tokenizer.ggml.tokens", ["a", "bb", "ccc"], V.ARRAY, V.STRING),
                     KV("x.arr", [1, 2, 3], V.ARRAY, V.INT32)]
        _FUZZ_BASE["b"] = _write(tmp_dir, kv=kv, specs=_specs(f16, f32, q8), name="base.gguf").read_bytes()
    return _FUZZ_BASE["b"]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_byte_flips_never_crash(tmp_path, flips, cut):
    data = bytearray(_fuzz_base(tmp_path))
    for pos, x in flips:
        data[pos % len(data)] ^= x
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    p = tmp_path / "fuzz.gguf"
    p.write_bytes(bytes(data))
    r = verify_gguf(p)
    assert isinstance(r, VerifyReport) and r.ok == (not r.problems)
    try:
        read_gguf(p).close()
    except GGUFFormatError:
        assert not r.ok


def test_qwen2moe_is_shape_checked_as_llama_cpp_loads_it(tmp_path):
    """qwen2moe (llama.cpp models/qwen2moe.cpp at the pinned version): routed experts of expert_feed_forward_length,
    the shared expert ffn_{gate,up,down}_shexp of expert_shared_feed_forward_length, its gate ffn_gate_inp_shexp
    {n_embd} (written (1, n_embd) by the converter), wq/wo n_embd x n_embd, output required, biases optional."""
    from quant.gguf_reader import read_gguf
    from quant.model_plan import CHECKED_ARCHS, check_architecture
    from quantgate.convert import convert_model
    from tests.quantgate.tiny_hf import make_tiny_model

    hf = make_tiny_model(tmp_path / "hf", "qwen2moe", seed=3)
    convert_model(hf, tmp_path / "m.gguf", "f16")
    with read_gguf(tmp_path / "m.gguf") as g:
        kv = {k.key: k.value for k in g.kv}
        shapes = {t.name: tuple(t.shape) for t in g.tensors}
    assert "qwen2moe" in CHECKED_ARCHS and check_architecture("qwen2moe", kv, shapes) == []
    assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (1, 256)
    assert check_architecture("qwen2moe", kv, {**shapes, "blk.0.ffn_gate_inp_shexp.weight": (256,)}) == []
    for name, shape in (("blk.0.ffn_gate_shexp.weight", (256, 256)),      # shared width is 512, not the experts' 256
                        ("blk.1.ffn_down_exps.weight", (4, 256, 512)),     # routed width is 256
                        ("blk.0.ffn_gate_inp_shexp.weight", (2, 256))):
        problems = check_architecture("qwen2moe", kv, {**shapes, name: shape})
        assert len(problems) == 1 and repr(name) in problems[0] and "has shape" in problems[0], problems
    for gone in ("output.weight", "blk.1.ffn_up_shexp.weight", "blk.0.ffn_gate_inp_shexp.weight"):
        problems = check_architecture("qwen2moe", kv, {k: v for k, v in shapes.items() if k != gone})
        assert len(problems) == 1 and gone in problems[0] and "missing" in problems[0], problems
    no_bias = {k: v for k, v in shapes.items() if not k.endswith(".bias")}
    assert check_architecture("qwen2moe", kv, no_bias) == []
    no_width = {k: v for k, v in kv.items() if k != "qwen2moe.expert_shared_feed_forward_length"}
    problems = check_architecture("qwen2moe", no_width, shapes)  # falls back to n_ff = 768: the shexp shapes differ
    assert problems and all("shexp" in p for p in problems)
    no_exp = {k: v for k, v in kv.items() if k != "qwen2moe.expert_count"}
    assert any("qwen2moe.expert_count is missing" in p for p in check_architecture("qwen2moe", no_exp, shapes))
