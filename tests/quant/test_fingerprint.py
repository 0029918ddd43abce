"""Weights fingerprint: one value for an HF folder and its F32/F16/BF16 GGUFs, whoever converted them (quantgate
convert or llama.cpp's pinned convert_hf_to_gguf.py), another for another model; BF16 rounding; the cache."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.hashing import cache_dir
from quant.fingerprint import bf16_bits, combine, tensor_digest, weights_fingerprint
from quantgate.convert import convert_model
from tests.conftest import require_llamacpp_src
from tests.quantgate.test_convert import _RUN_CONVERTER
from tests.quantgate.tiny_hf import make_tiny_model


def llama_cpp_convert(model: Path, out: Path, outtype: str, pre: str = "") -> Path:
    """Run the pinned llama.cpp convert_hf_to_gguf.py (as tests/quantgate/test_convert.py does)."""
    script = require_llamacpp_src() / "convert_hf_to_gguf.py"
    subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(script), pre, str(model), "--outfile", str(out),
                    "--outtype", outtype], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("fp")
    return {"llama": make_tiny_model(d / "llama", "llama", seed=0), "qwen2": make_tiny_model(d / "qwen2", "qwen2", seed=1),
            "other": make_tiny_model(d / "other", "llama", seed=7)}


@pytest.mark.parametrize("arch,pre", [("llama", ""), ("qwen2", "qwen2")])
def test_same_fingerprint_for_every_float_container(models, tmp_path, arch, pre):
    hf = models[arch]
    want = weights_fingerprint(hf)
    files = {f"ours-{t}": convert_model(hf, tmp_path / f"ours-{t}.gguf", t) and tmp_path / f"ours-{t}.gguf"
             for t in ("f32", "f16", "bf16")}
    files.update({f"llama.cpp-{t}": llama_cpp_convert(hf, tmp_path / f"lc-{t}.gguf", t, pre)
                  for t in ("f32", "f16", "bf16")})
    got = {k: weights_fingerprint(p) for k, p in files.items()}
    assert got == {k: want for k in files}
    assert weights_fingerprint(models["other"]) != want


def test_bf16_rounding_is_round_to_nearest_even_and_nan_stays_nan():
    import gguf

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(4096).astype(np.float32) * 0.02,
                        np.array([1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, -0.0, np.inf, np.nan], dtype=np.float32)])
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view("<u2")  # what gguf-py writes for bf16
    assert np.array_equal(bf16_bits(x), ref)
    assert bf16_bits(np.array([1.0 + 2 ** -8], np.float32))[0] == 0x3F80     # tie -> even
    assert bf16_bits(np.array([1.0 + 3 * 2 ** -8], np.float32))[0] == 0x3F82
    # values that differ below BF16's precision share a digest; one BF16 step apart they do not
    a = np.float32(0.5) + np.arange(8, dtype=np.float32) * 2 ** -6
    assert tensor_digest(a) == tensor_digest(a + 2 ** -14) != tensor_digest(a + 2 ** -7)
    assert combine({"b": ((2,), "x"), "a": ((1,), "y")}) == combine({"a": ((1,), "y"), "b": ((2,), "x")})
    assert combine({"a": ((1, 2), "y")}) != combine({"a": ((2, 1), "y")})


def test_digest_through_the_bf16_kernel_equals_the_definition():
    """tensor_digest rounds with the BF16 kernel: the same bits as bf16_bits (the definition), on chunk and row
    boundaries, NaN payloads, infinities and subnormals included."""
    import hashlib

    rng = np.random.default_rng(1)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 1e-40, -1e-45, 3.0e38, 1.0 + 2 ** -8], np.float32)
    special = np.concatenate([special, np.array([0x7F800001, 0xFFC00123], np.uint32).view(np.float32)])
    for n in (1, 4095, 4096 * 3 + 17, (1 << 22) + 5):
        x = rng.standard_normal(n).astype(np.float32)
        x[: min(n, special.size)] = special[: min(n, special.size)]
        want = hashlib.sha256()
        for s in range(0, n, 1 << 22):
            want.update(bf16_bits(x[s:s + (1 << 22)]).tobytes())
        assert tensor_digest(x.reshape(1, -1) if n % 2 else x) == want.hexdigest()


def test_fingerprint_is_cached_by_path_size_and_mtime(models, tmp_path):
    gguf_path = convert_model(models["llama"], tmp_path / "m.gguf", "f16") and tmp_path / "m.gguf"
    fp = weights_fingerprint(gguf_path)
    cache = json.loads((cache_dir() / "fingerprint_cache.json").read_text())
    key = next(k for k in cache if str(gguf_path.resolve()) in k)
    assert cache[key] == fp
    cache[key] = "f" * 64  # a cached value is trusted while (path, size, mtime) are unchanged...
    (cache_dir() / "fingerprint_cache.json").write_text(json.dumps(cache))
    assert weights_fingerprint(gguf_path) == "f" * 64
    gguf_path.touch()  # ...and recomputed once the file changes
    import os
    st = gguf_path.stat()
    os.utime(gguf_path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    assert weights_fingerprint(gguf_path) == fp


@pytest.mark.parametrize("container", ["hf", "ours-f16", "llama.cpp-bf16"])
def test_tap_gives_weights_fingerprint_from_the_tensors_read_once(tmp_path, monkeypatch, container):
    """FingerprintTap (the quantize loop's one-read fingerprint): the tensors a pass reads, added as read (here:
    every other one; finish() reads the rest), give weights_fingerprint's value, and it is cached."""
    from quant.fingerprint import FingerprintTap, cached_fingerprint
    from quant.loaders import open_checkpoint

    hf = make_tiny_model(tmp_path / "hf", "llama", seed=0)  # a fresh path: not in the fingerprint cache yet
    path = {"hf": hf, "ours-f16": tmp_path / "o.gguf", "llama.cpp-bf16": tmp_path / "l.gguf"}[container]
    if container == "ours-f16":
        convert_model(hf, path, "f16")
    elif container == "llama.cpp-bf16":
        llama_cpp_convert(hf, path, "bf16")
    with open_checkpoint(path) as ck:
        assert cached_fingerprint(ck.files) == (False, None)
        tap = FingerprintTap.open(ck)
        for t in ck.tensors[::2]:
            tap.add(t, t.read_scratch())
        fp = tap.finish()
        assert cached_fingerprint(ck.files) == (True, fp)
    assert fp == weights_fingerprint(hf)
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cold"))  # the pass-of-its-own definition, uncached
    assert weights_fingerprint(path) == fp


def test_tap_refuses_what_it_cannot_map(tmp_path):
    """A GGUF whose tensors have no HF names gets no tap (quantize then fingerprints it in a pass of its own)."""
    from gguf.constants import GGUFValueType as V

    from quant.fingerprint import FingerprintTap
    from quant.gguf_kv import KV
    from quant.gguf_writer import TensorSpec, write_gguf
    from quant.loaders import open_checkpoint

    x = np.ones((2, 32), np.float32)
    write_gguf(tmp_path / "x.gguf", kv=[KV("general.architecture", "llama", V.STRING)],
               tensors=[TensorSpec("mystery", x.shape, "F32", lambda: x.view(np.uint8))])
    with open_checkpoint(tmp_path / "x.gguf") as ck:
        assert FingerprintTap.open(ck) is None
