"""IQ4_NL/IQ4_XS/TQ1_0/TQ2_0/MXFP4 through the whole tool: --tensor-type / --output-tensor-type /
--token-embedding-type overrides give, for every tensor, the type and bytes llama_model_quantize writes (with and
without an importance matrix); the CLI's file passes verify, shows in inspect, reads in gguf and runs in
llama-cpp-python."""
from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf import quants as gguf_quants
from gguf.constants import GGMLQuantizationType
from typer.testing import CliRunner

import quant
from core.records import QuantizeRequest
from quantgate.cli import app
from quantgate.pipeline import quantize_model
from quantgate.sample import SampleShape, make_sample_checkpoint

runner = CliRunner()
# ffn_down rows of 640: IQ4_XS falls back to IQ4_NL and TQ1_0/TQ2_0 to Q4_0, as llama.cpp's tensor_type_fallback does
SHAPE = SampleShape(n_layer=2, n_embd=256, n_ff=640, n_head=4, n_head_kv=2, n_vocab=512)
OVERRIDES = (("blk.0.ffn_down", "IQ4_XS"), ("blk.1.ffn_down", "TQ1_0"), ("ffn_up", "TQ1_0"), ("ffn_gate", "TQ2_0"),
             ("attn_q", "MXFP4"), ("attn_k", "IQ4_NL"), ("attn_v", "IQ4_XS"), ("attn_output", "TQ2_0"))
OUTPUT_TYPE, EMBD_TYPE = "IQ4_XS", "IQ4_NL"
NEW_TYPES = {"IQ4_NL", "IQ4_XS", "TQ1_0", "TQ2_0", "MXFP4"}
REFERENCE = Path(__file__).resolve().parents[2] / "models" / "reference"  # trained tiny Llama, with its tokenizer


@pytest.fixture(scope="module")
def f16_gguf(tmp_path_factory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("newtypes")
    hf = make_sample_checkpoint(d / "hf", SHAPE, seed=5)
    out = d / "model-F16.gguf"
    quantize_model(QuantizeRequest(source=hf, out=out, precision="F16"), record=False)
    return hf, out


def _tensors(path: Path) -> dict[str, tuple[str, bytes]]:
    r = GGUFReader(path)
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8).reshape(-1))) for t in r.tensors}


def _llama_quantize(src: Path, dst: Path, imatrix: dict[str, np.ndarray] | None) -> None:
    """llama_model_quantize with Q4_K_M, OVERRIDES, OUTPUT_TYPE and EMBD_TYPE (and an imatrix when given)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = 15  # Q4_K_M
    p.nthread = 2
    p.output_tensor_type = int(GGMLQuantizationType[OUTPUT_TYPE])
    p.token_embedding_type = int(GGMLQuantizationType[EMBD_TYPE])
    keep: list = [pat.encode() for pat, _ in OVERRIDES]
    arr = (llama_cpp.llama_model_tensor_override * (len(OVERRIDES) + 1))()
    for i, ((_, typ), pat) in enumerate(zip(OVERRIDES, keep)):
        arr[i].pattern = pat
        arr[i].type = int(GGMLQuantizationType[typ])
    arr[len(OVERRIDES)].pattern = None
    p.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    if imatrix:
        im = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, vals) in enumerate(imatrix.items()):
            v = np.ascontiguousarray(vals, dtype=np.float32)
            keep.append(v)
            im[i].name = name.encode()
            im[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            im[i].size = v.size
        im[len(imatrix)].name = None
        keep.append(im)
        p.imatrix = ctypes.cast(im, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    assert rc == 0, f"llama_model_quantize failed with {rc}"


def _write_imatrix(f16: Path, path: Path) -> dict[str, np.ndarray]:
    from quant.imatrix import Imatrix, ImatrixEntry, save_imatrix_gguf

    rng = np.random.default_rng(7)
    entries = {}
    for t in GGUFReader(f16).tensors:
        if t.name.endswith(".weight") and t.tensor_type.name == "F16" and "token_embd" not in t.name:
            sums = (rng.gamma(0.5, 2.0, int(t.shape[0])) * 37).astype(np.float32)
            entries[t.name] = ImatrixEntry(sums=sums, counts=np.array([37], dtype=np.float32))
    imat = Imatrix(entries=entries, datasets=["test"], chunk_count=1, chunk_size=512)
    save_imatrix_gguf(imat, path)
    return {n: imat.values(n) for n in entries}


@pytest.mark.oracle
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_overrides_match_llama_model_quantize_byte_for_byte(require_oracle, f16_gguf, tmp_path, with_imatrix):
    _, f16 = f16_gguf
    ipath = tmp_path / "imatrix.gguf"
    imat = _write_imatrix(f16, ipath) if with_imatrix else None
    ref = tmp_path / "ref.gguf"
    _llama_quantize(f16, ref, imat)
    ours = tmp_path / "ours.gguf"
    quantize_model(QuantizeRequest(source=f16, out=ours, precision="Q4_K_M", tensor_type_overrides=OVERRIDES,
                                   output_tensor_type=OUTPUT_TYPE, token_embedding_type=EMBD_TYPE,
                                   imatrix=ipath if with_imatrix else None), record=False)
    a, b = _tensors(ours), _tensors(ref)
    assert sorted(a) == sorted(b)
    assert {n: a[n][0] for n in a} == {n: b[n][0] for n in b}
    assert NEW_TYPES | {"Q4_0"} <= {t for t, _ in a.values()}  # every new type, and the TQ -> Q4_0 fallback
    assert a["blk.0.ffn_down.weight"][0] == "IQ4_NL" and a["blk.1.ffn_down.weight"][0] == "Q4_0"  # rows of 640
    assert [n for n in a if a[n][1] != b[n][1]] == []


def _logits(path: Path, ids: list[int]) -> np.ndarray:
    """llama.cpp's logits for every position of `ids` (llama-cpp-python's C API). use_extra_bufts is off: on an
    AMX CPU a native build repacks Q8_0/Q6_K/IQ4_XS/... into its AMX buffer, whose matmul segfaults on this
    project's build machine for every such type (Q8_0 included), unrelated to the file; the generic CPU kernels
    still read and compute every tensor type of the file."""
    import llama_cpp as lc

    mp = lc.llama_model_default_params()
    mp.use_extra_bufts = False
    model = lc.llama_model_load_from_file(str(path).encode(), mp)
    assert model, f"llama.cpp cannot load {path}"
    cp = lc.llama_context_default_params()
    cp.n_ctx, cp.n_threads, cp.n_threads_batch = 64, 2, 2
    ctx = lc.llama_init_from_model(model, cp)
    try:
        n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(model))
        out = []
        for i, tok in enumerate(ids):  # one token per decode: the logits of each position
            arr = (lc.llama_token * 1)(tok)
            assert lc.llama_decode(ctx, lc.llama_batch_get_one(arr, 1)) == 0, f"decode failed at {i}"
            out.append(np.ctypeslib.as_array(lc.llama_get_logits_ith(ctx, -1), shape=(n_vocab,)).copy())
        return np.stack(out)
    finally:
        lc.llama_free(ctx)
        lc.llama_model_free(model)


IDS = [1, 17, 42, 99, 7, 300, 12, 5]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """The bundled reference model (llama.cpp can load it: it has a tokenizer), its F16 GGUF and llama.cpp's F16
    logits."""
    d = tmp_path_factory.mktemp("tiny")
    hf = REFERENCE
    f16 = d / "f16.gguf"
    assert runner.invoke(app, ["quantize", "-m", str(hf), "-p", "F16", "-o", str(f16), "--quiet"]).exit_code == 0
    return {"hf": hf, "f16": f16, "logits": _logits(f16, IDS), "dir": d}


def _all_in(tiny: dict, qtype: str) -> np.ndarray:
    """Quantize every tensor llama.cpp would quantize to `qtype` (CLI), verify the file, return its logits."""
    out = tiny["dir"] / f"all-{qtype}.gguf"
    if not out.exists():
        res = runner.invoke(app, ["quantize", "-m", str(tiny["hf"]), "-p", "Q8_0", "-o", str(out), "--quiet",
                                  "--tensor-type", f".*={qtype}", "--output-tensor-type", qtype,
                                  "--token-embedding-type", qtype])
        assert res.exit_code == 0, res.stderr
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    return _logits(out, IDS)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1])


@pytest.mark.oracle
def test_cli_file_verifies_inspects_reads_and_runs(require_oracle, tiny, tmp_path):
    hf, f16 = tiny["hf"], tiny["f16"]
    out = tmp_path / "m.gguf"
    args = ["quantize", "-m", str(hf), "-p", "Q4_K_M", "-o", str(out), "--json", "--quiet",
            "--tensor-type", "ffn_.*=IQ4_XS", "--tensor-type", "attn_[qk]=TQ1_0", "--tensor-type", "attn_v=MXFP4",
            "--tensor-type", "attn_output=TQ2_0", "--output-tensor-type", "IQ4_NL",
            "--token-embedding-type", "MXFP4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.stderr
    types = json.loads(res.stdout)["tensor_types"]
    assert types["blk.1.ffn_up.weight"] == "IQ4_XS" and types["blk.1.ffn_down.weight"] == "IQ4_XS"
    assert types["blk.0.attn_q.weight"] == "TQ1_0" and types["blk.0.attn_v.weight"] == "MXFP4"
    assert types["output.weight"] == "IQ4_NL" and types["token_embd.weight"] == "MXFP4"

    ok = runner.invoke(app, ["verify", str(out)])
    assert ok.exit_code == 0 and "valid" in ok.stdout, ok.stdout + ok.stderr
    ins = runner.invoke(app, ["inspect", str(out), "--json"])
    assert ins.exit_code == 0
    per_type = json.loads(ins.stdout)["totals"]["tensors_per_type"]
    assert NEW_TYPES <= set(per_type)

    # gguf reads every tensor and its dequantizer agrees with ours, bit for bit
    for t in GGUFReader(out).tensors:
        if t.tensor_type.name in NEW_TYPES:
            shape = tuple(int(d) for d in reversed(t.shape))
            raw = np.asarray(t.data).view(np.uint8)
            ours = quant.dequantize(raw, t.tensor_type.name, shape)
            ref = gguf_quants.dequantize(raw, t.tensor_type).reshape(shape)
            assert np.array_equal(ours.view(np.uint32), ref.view(np.uint32)), t.name

    q = _logits(out, IDS)
    assert q.shape == tiny["logits"].shape == (len(IDS), 4096) and np.isfinite(q).all() and q.std() > 0
    assert not np.array_equal(q, tiny["logits"])  # really the quantized weights
    assert np.array_equal(q, _logits(out, IDS))  # deterministic


@pytest.mark.oracle
@pytest.mark.parametrize("qtype", ["IQ4_NL", "IQ4_XS", "MXFP4"])
def test_4bit_types_follow_f16_in_llama_cpp(require_oracle, tiny, qtype):
    """A whole model in one 4-bit type: llama.cpp's logits follow F16's about as closely as with Q4_0."""
    ref = _corr(_all_in(tiny, "Q4_0"), tiny["logits"])
    assert _corr(_all_in(tiny, qtype), tiny["logits"]) > min(0.9 * ref, 0.95), ref
