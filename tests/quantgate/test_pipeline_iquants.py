"""The i-quants through the tool: --tensor-type overrides with an imatrix give a GGUF that verifies, that gguf reads
(and dequantizes as we do), that llama-cpp-python loads, with every i-quant tensor byte-identical to
ggml_quantize_chunk; without an imatrix the quantization is refused as llama-quantize refuses it."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import quant
from core.errors import ImatrixRequiredError
from core.records import QuantizeRequest
from quant.imatrix import Imatrix, ImatrixEntry, save_imatrix_gguf
from quant.verify import verify_gguf
from quantgate.cli import app
from quantgate.pipeline import quantize_model
from tests.quantgate.tiny_hf import make_tiny_model

OVERRIDES = (("ffn_up", "IQ2_XXS"), ("ffn_gate", "IQ2_XS"), ("ffn_down", "IQ1_S"), ("attn_q", "IQ3_XXS"),
             ("attn_k", "IQ3_S"), ("attn_v", "IQ2_S"), ("attn_output", "IQ1_M"))


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny HF model (rows of 256 and 768) and an imatrix for every quantizable tensor but token_embd."""
    d = tmp_path_factory.mktemp("iq")
    hf = make_tiny_model(d / "hf", "mistral", seed=5)  # rows of 256 and 768, with a tokenizer llama.cpp loads
    f16 = d / "f16.gguf"
    quantize_model(QuantizeRequest(source=hf, out=f16, precision="F16"), record=False)
    from gguf import GGUFReader

    rng = np.random.default_rng(3)
    entries = {t.name: ImatrixEntry(sums=(rng.gamma(0.5, 2.0, int(t.shape[0])) * 37).astype(np.float32),
                                    counts=np.array([37], np.float32))
               for t in GGUFReader(f16).tensors
               if t.name.endswith(".weight") and t.tensor_type.name == "F16" and "token_embd" not in t.name}
    ipath = d / "imatrix.gguf"
    save_imatrix_gguf(Imatrix(entries=entries, datasets=["test"], chunk_count=1, chunk_size=512), ipath)
    return hf, ipath


@pytest.mark.oracle
def test_iquant_overrides_verify_read_load_and_match_ggml(require_oracle, model, tmp_path):
    import llama_cpp
    from gguf import GGUFReader

    from quant.imatrix import load_imatrix

    hf, ipath = model
    out = tmp_path / "iq.gguf"
    art = quantize_model(QuantizeRequest(source=hf, out=out, precision="Q8_0", imatrix=ipath,
                                         tensor_type_overrides=OVERRIDES), record=False)
    for sub, qtype in OVERRIDES:
        assert {art.tensor_types[f"blk.{i}.{sub}.weight"] for i in range(2)} == {qtype}
    assert verify_gguf(out).ok

    imat = load_imatrix(ipath)
    f16 = {t.name: t for t in GGUFReader(hf.parent / "f16.gguf").tensors}
    n_checked = 0
    for t in GGUFReader(out).tensors:
        qtype = t.tensor_type.name
        if not qtype.startswith("IQ"):
            continue
        raw = np.asarray(t.data).view(np.uint8).reshape(int(t.shape[1]), -1)
        x = np.asarray(f16[t.name].data).astype(np.float32).reshape(int(t.shape[1]), int(t.shape[0]))
        ref = require_oracle.ggml_quantize(x, qtype, imat.values(t.name))
        assert np.array_equal(raw, ref), t.name
        from gguf import quants as gguf_quants

        assert np.array_equal(quant.dequantize(raw, qtype, x.shape), gguf_quants.dequantize(raw, t.tensor_type))
        n_checked += 1
    assert n_checked == 2 * len(OVERRIDES)

    # llama.cpp loads every tensor (type, size, layout) and the tokenizer; decoding is not exercised here: in this
    # environment llama-cpp-python's decode segfaults on these tiny models for plain Q8_0 files too
    llm = llama_cpp.Llama(str(out), n_ctx=64, n_threads=2, seed=0, verbose=False)
    assert llm.n_vocab() == 512 and llm.tokenize(b"hello", add_bos=True)[0] == 1
    del llm


def test_iquant_override_without_imatrix_is_refused(model, tmp_path):
    hf, _ = model
    out = tmp_path / "o.gguf"
    with pytest.raises(ImatrixRequiredError, match="offending tensor: blk.0.ffn_up.weight, target type: IQ2_XXS"):
        quantize_model(QuantizeRequest(source=hf, out=out, precision="Q8_0",
                                       tensor_type_overrides=(("ffn_up", "IQ2_XXS"),)), record=False)
    assert not out.exists()


def test_cli_refuses_iquants_without_imatrix_but_not_for_token_embd_or_iq3_s(model, tmp_path):
    """llama-quantize's exceptions: token_embd/output never need one; IQ3_S (unlike IQ3_XXS) never does."""
    hf, _ = model
    runner = CliRunner()
    out = tmp_path / "o.gguf"
    res = runner.invoke(app, ["quantize", "-m", str(hf), "-p", "Q8_0", "-o", str(out), "--tensor-type",
                              "ffn_.*=IQ2_XXS"])
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "requires an importance matrix" in lines[0]
    assert not out.exists()
    for override in ("attn_q=IQ3_S", "token_embd=IQ3_XXS"):
        res = runner.invoke(app, ["quantize", "-m", str(hf), "-p", "Q8_0", "-o", str(out), "--tensor-type",
                                  override])
        assert res.exit_code == 0, res.stderr
        out.unlink()
