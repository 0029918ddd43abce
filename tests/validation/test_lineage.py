"""structural:derived_from by content: llama.cpp's converter output quantized by quantgate (fingerprint recorded)
and by llama.cpp's llama_model_quantize (no quantgate metadata) both derive from the HF folder; another model's
GGUF fails naming a tensor; the per-type weights check itself."""
from __future__ import annotations

from pathlib import Path

import pytest

from core.records import QuantizeRequest
from quant.fingerprint import weights_fingerprint
from quantgate.convert import convert_model
from quantgate.pipeline import quantize_model
from tests.quant.test_fingerprint import llama_cpp_convert
from tests.quantgate.test_pipeline_llamacpp import _llama_quantize
from tests.quantgate.tiny_hf import make_tiny_model
from validation.structural import derived_from_gate, inspect_candidate, read_metadata, structural_gates
from validation.tensor_error import LINEAGE_REL_RMSE, weights_lineage


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("lineage")
    hf = make_tiny_model(d / "hf", "llama", seed=0)
    other = make_tiny_model(d / "other", "llama", seed=9)
    return {"dir": d, "hf": hf, "other": other, "lc_f16": llama_cpp_convert(hf, d / "lc-f16.gguf", "f16"),
            "other_f16": llama_cpp_convert(other, d / "other-f16.gguf", "f16")}


def _gate(candidate: Path, baseline: Path):
    gates = {g.name: g for g in structural_gates(candidate, baseline=baseline)[1]}
    return gates["structural:derived_from"]


def test_quantgate_quantized_llama_cpp_conversion_derives_from_hf_folder(env, tmp_path):
    out = tmp_path / "ours-q4km.gguf"
    art = quantize_model(QuantizeRequest(source=env["lc_f16"], out=out, precision="Q4_K_M"), record=False)
    meta = read_metadata(out)
    assert meta["quantgate.source_sha256"] == art.source_sha256  # the F16 GGUF's bytes, not the HF folder's
    assert meta["quantgate.source_fingerprint"] == weights_fingerprint(env["hf"])
    g = _gate(out, env["hf"])
    assert g.passed and "source_fingerprint" in g.detail and "matches" in g.detail
    g_other = _gate(out, env["other"])  # the recorded fingerprint differs and the weights do too
    assert not g_other.passed and "differs" in g_other.detail and "tensor " in g_other.detail


def test_quantgate_convert_output_records_the_fingerprint(env, tmp_path):
    """`quantgate convert` records quantgate.source_fingerprint like quantize does, so its F16 GGUF derives by content
    from another container of the same weights (llama.cpp's conversion: other bytes, same fingerprint), and so does
    a quantization of it; another model's conversion does not."""
    conv = Path(convert_model(env["hf"], tmp_path / "ours-f16.gguf", "f16").path)
    meta = read_metadata(conv)
    assert meta["quantgate.source_fingerprint"] == weights_fingerprint(env["hf"]) == weights_fingerprint(conv)
    g = _gate(conv, env["lc_f16"])
    assert g.passed and "source_fingerprint" in g.detail and "matches" in g.detail, g.detail
    g_other = _gate(conv, env["other_f16"])
    assert not g_other.passed and "differs" in g_other.detail
    q = tmp_path / "ours-q8.gguf"
    quantize_model(QuantizeRequest(source=conv, out=q, precision="Q8_0"), record=False)
    assert read_metadata(q)["quantgate.source_fingerprint"] == meta["quantgate.source_fingerprint"]


@pytest.mark.parametrize("mix,ftype", [("Q4_K_M", 15), ("Q2_K", 10), ("Q8_0", 7)])
def test_llama_model_quantize_output_derives_from_hf_folder(require_oracle, env, tmp_path, mix, ftype):
    out = tmp_path / f"lc-{mix}.gguf"
    _llama_quantize(env["lc_f16"], out, ftype)
    facts = inspect_candidate(out)
    assert facts.source_sha256 is None and facts.source_fingerprint is None  # no quantgate metadata at all
    g = _gate(out, env["hf"])
    assert g.passed, g.detail
    assert "no quantgate provenance" in g.detail and "within their type's error bound" in g.detail


def test_another_models_gguf_fails_naming_the_tensor(require_oracle, env, tmp_path):
    out = tmp_path / "other-q4km.gguf"
    _llama_quantize(env["other_f16"], out, 15)
    g = _gate(out, env["hf"])
    assert not g.passed
    first = inspect_candidate(out).tensor_types
    assert "differs from the baseline's" in g.detail
    named = g.detail.split("tensor ", 1)[1].split(" ", 1)[0]
    assert named in first
    g_f16 = _gate(env["other_f16"], env["hf"])  # an unquantized GGUF of another model too
    assert not g_f16.passed and "relative RMSE" in g_f16.detail


def test_weights_check_bounds_and_mismatches(env, tmp_path):
    """The weights check on its own: the F16 conversion is within F16's bound (tiny error); each failure kind
    is named; every type quantgate can dequantize has a bound."""
    chk = weights_lineage(env["hf"], env["lc_f16"])
    assert chk.problem is None and chk.n_checked == chk.n_tensors > 0
    assert chk.worst is not None and chk.worst.rel_rmse < 1e-3
    from quant.formats import QTYPES

    assert set(QTYPES) <= set(LINEAGE_REL_RMSE)
    other = weights_lineage(env["hf"], env["other_f16"])
    assert other.problem is not None and other.n_checked == 1  # stops at the first tensor
    assert float(other.problem.split("relative RMSE ")[1].split(" ")[0]) > 0.9
    # a candidate laid out for another shape (qwen2 model with other dims) is named by its first foreign tensor
    qwen = make_tiny_model(tmp_path / "q", "qwen2", seed=2, n_layer=3)
    qf16 = tmp_path / "q.gguf"
    quantize_model(QuantizeRequest(source=qwen, out=qf16, precision="F16"), record=False)
    mism = weights_lineage(env["hf"], qf16)
    assert mism.problem.startswith("tensor blk.0.attn_") and mism.problem.endswith(".bias is not in the baseline") and mism.n_checked == 0


def test_fingerprint_gate_without_source_sha(env, tmp_path):
    """derived_from on facts alone: a recorded fingerprint equal to the baseline's passes without the weights
    check, whatever source_sha256 says."""
    out = tmp_path / "q8.gguf"
    quantize_model(QuantizeRequest(source=env["lc_f16"], out=out, precision="Q8_0"), record=False)
    facts = inspect_candidate(out)
    g = derived_from_gate(facts, env["hf"], "0" * 64)
    assert g.passed and "source_fingerprint" in g.detail and "checked by weights" not in g.detail
    facts.source_fingerprint = "1" * 64
    g2 = derived_from_gate(facts, env["hf"], "0" * 64)
    assert g2.passed and "checked by weights" in g2.detail  # fingerprint differs, weights still within bounds
