"""Whole-model proof: our quantized GGUF has, for every tensor, the type and the bytes llama.cpp's own
llama_model_quantize produces from the same F16 GGUF (with and without an importance matrix)."""
from __future__ import annotations

import ctypes
from pathlib import Path

import numpy as np
import pytest

from core.records import QuantizeRequest
from quantgate.pipeline import quantize_model
from quantgate.sample import SampleShape, make_sample_checkpoint

MIXES = {"Q8_0": 7, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
         "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "Q4_0": 2, "Q5_1": 9}


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("model")
    hf = make_sample_checkpoint(d / "hf", SampleShape(n_layer=4, n_embd=256, n_ff=768, n_vocab=512), seed=3)
    out = d / "model-F16.gguf"
    quantize_model(QuantizeRequest(source=hf, out=out, precision="F16"))
    return hf, out


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8).reshape(-1))) for t in r.tensors}


def _llama_quantize(src: Path, dst: Path, ftype: int, imatrix: dict[str, np.ndarray] | None = None) -> None:
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = 2
    keep = []
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vals) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(vals, dtype=np.float32)
            keep.append(v)
            arr[i].name = name.encode()
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        keep.append(arr)
        p.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize failed with {rc}"


def _assert_same(ours: Path, ref: Path) -> None:
    a, b = _tensors(ours), _tensors(ref)
    assert sorted(a) == sorted(b)
    wrong_type = {n: (a[n][0], b[n][0]) for n in a if a[n][0] != b[n][0]}
    assert not wrong_type, f"tensor types differ (ours, llama.cpp): {wrong_type}"
    wrong_bytes = [n for n in a if a[n][1] != b[n][1]]
    assert not wrong_bytes, f"tensor bytes differ: {wrong_bytes}"


@pytest.mark.oracle
@pytest.mark.parametrize("mix", sorted(MIXES))
def test_every_tensor_matches_llama_model_quantize(require_oracle, f16_gguf, tmp_path, mix):
    hf, f16 = f16_gguf
    ref = tmp_path / "ref.gguf"
    _llama_quantize(f16, ref, MIXES[mix])
    ours = tmp_path / "ours.gguf"
    art = quantize_model(QuantizeRequest(source=f16, out=ours, precision=mix))
    _assert_same(ours, ref)
    # Straight from the HF folder (F16 weights) gives the same tensors as going through the F16 GGUF.
    ours_hf = tmp_path / "ours-hf.gguf"
    art_hf = quantize_model(QuantizeRequest(source=hf, out=ours_hf, precision=mix))
    _assert_same(ours_hf, ref)
    assert art.tensor_types == art_hf.tensor_types


@pytest.mark.oracle
@pytest.mark.parametrize("mix", ["Q4_K_M", "Q2_K", "Q3_K_M", "Q5_K_S", "Q6_K", "Q4_0", "Q5_1"])
def test_imatrix_quantization_matches_llama_model_quantize(require_oracle, f16_gguf, tmp_path, mix):
    from quant.imatrix import Imatrix, ImatrixEntry, save_imatrix_gguf

    _, f16 = f16_gguf
    rng = np.random.default_rng(7)
    entries = {}
    for name, (typ, raw) in _tensors(f16).items():
        if name.endswith(".weight") and typ == "F16" and "token_embd" not in name:
            from gguf import GGUFReader

            cols = next(t for t in GGUFReader(f16).tensors if t.name == name).shape[0]
            sums = (rng.gamma(0.5, 2.0, cols) * 37).astype(np.float32)
            entries[name] = ImatrixEntry(sums=sums, counts=np.array([37], dtype=np.float32))
    imat = Imatrix(entries=entries, datasets=["test"], chunk_count=1, chunk_size=512)
    ipath = tmp_path / "imatrix.gguf"
    save_imatrix_gguf(imat, ipath)
    ref = tmp_path / "ref.gguf"
    _llama_quantize(f16, ref, MIXES[mix], imatrix={n: imat.values(n) for n in entries})
    ours = tmp_path / "ours.gguf"
    art = quantize_model(QuantizeRequest(source=f16, out=ours, precision=mix, imatrix=ipath))
    assert art.recipe.imatrix_sha256
    _assert_same(ours, ref)
