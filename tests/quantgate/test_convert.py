"""`quantgate convert`: the same file (KVs in order, tensor names, order, types and bytes) as the pinned
llama.cpp convert_hf_to_gguf.py, plus the command line, errors, --generic and the tokenizer in `quantize`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from core.errors import CheckpointError
from core.records import QuantizeRequest
from quantgate.cli import app
from quantgate.convert import convert_model, converted_type
from quantgate.pipeline import quantize_model
from tests.conftest import require_llamacpp_src
from tests.quantgate.tiny_hf import make_tiny_model

# Runs the pinned converter; for our tiny BPE tokenizer (unknown chkhsh) it answers "qwen2" like our regex rule.
_RUN_CONVERTER = """
import runpy, sys
script, pre = sys.argv[1], sys.argv[2]
sys.argv = sys.argv[:1] + sys.argv[3:]
sys.path.insert(0, str(__import__("pathlib").Path(script).parent))
if pre:
    import conversion.base as b
    b.TextModel.get_vocab_base_pre = lambda self, tok: pre
sys.argv[0] = script
runpy.run_path(script, run_name="__main__")
"""


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("tiny")
    return {a: make_tiny_model(d / a, a, seed=i) for i, a in enumerate(("llama", "qwen2"))}


def _gguf(path: Path) -> tuple[list, list]:
    from gguf import GGUFReader

    r = GGUFReader(path)
    kvs = [(f.name, [int(t) for t in f.types], [bytes(f.parts[i]) for i in f.data])
           for f in r.fields.values() if not f.name.startswith(("GGUF.", "quantgate."))]
    tensors = [(t.name, t.tensor_type.name, tuple(int(x) for x in t.shape),
                bytes(np.asarray(t.data).view(np.uint8).reshape(-1))) for t in r.tensors]
    return kvs, tensors


def _kv(path: Path, key: str):
    from gguf import GGUFReader

    f = GGUFReader(path).fields[key]
    return f.contents()


@pytest.mark.parametrize("arch,outtype,pre", [("llama", "f16", ""), ("qwen2", "f16", "qwen2"),
                                              ("llama", "bf16", "")])
def test_same_file_as_convert_hf_to_gguf(models, tmp_path, arch, outtype, pre):
    script = require_llamacpp_src() / "convert_hf_to_gguf.py"
    ref = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(script), pre, str(models[arch]),
                    "--outfile", str(ref), "--outtype", outtype], check=True, capture_output=True)
    ours = tmp_path / "ours.gguf"
    art = convert_model(models[arch], ours, outtype)
    (kv_a, t_a), (kv_b, t_b) = _gguf(ours), _gguf(ref)
    assert [k[0] for k in kv_a] == [k[0] for k in kv_b]
    assert [k[0] for k in kv_a if k not in kv_b] == []  # same types and values
    assert [t[:3] for t in t_a] == [t[:3] for t in t_b]  # names, order, types, shapes
    assert [t[0] for t in t_a if t not in t_b] == []  # bytes
    assert art.file_type == {"f16": 1, "bf16": 32}[outtype]
    assert _kv(ours, "quantgate.source_sha256") == art.source_sha256
    assert _kv(ours, "quantgate.tokenizer_pre_source") == ("sentencepiece" if arch == "llama" else "regex")


def test_tensor_types_per_outtype(models, tmp_path):
    art = convert_model(models["qwen2"], tmp_path / "f32.gguf", "f32")
    assert art.file_type == 0 and set(art.tensor_types.values()) == {"F32"}
    art = convert_model(models["qwen2"], tmp_path / "f16.gguf", "F16")
    assert art.tensor_types["blk.0.attn_q.bias"] == "F32"
    assert art.tensor_types["blk.0.attn_norm.weight"] == "F32" and art.tensor_types["output_norm.weight"] == "F32"
    assert art.tensor_types["blk.0.attn_q.weight"] == "F16" and art.tensor_types["token_embd.weight"] == "F16"
    assert "output.weight" not in art.tensor_types  # tied embeddings
    assert converted_type("rope_freqs.weight", (32,), "bf16") == "F32"
    assert converted_type("blk.0.ffn_up.weight", (512, 256), "bf16") == "BF16"
    with pytest.raises(Exception, match="outtype"):
        convert_model(models["qwen2"], tmp_path / "x.gguf", "q8_0")


def test_cli_convert_json_and_quantize_carries_tokenizer(models, tmp_path):
    out = tmp_path / "m.gguf"
    res = CliRunner().invoke(app, ["convert", "--model", str(models["llama"]), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    rec = json.loads(res.stdout)
    assert rec["file_type"] == 1 and rec["recipe"]["precision"] == "convert:f16" and Path(rec["path"]) == out
    conv_tok = [k for k in _gguf(out)[0] if k[0].startswith("tokenizer.")]
    q = tmp_path / "q.gguf"
    quantize_model(QuantizeRequest(source=models["llama"], out=q, precision="Q8_0"))
    assert [k for k in _gguf(q)[0] if k[0].startswith("tokenizer.")] == conv_tok
    assert [k[0] for k in conv_tok] == [
        "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
        "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.chat_template"]


def test_unsupported_architecture_and_generic(models, tmp_path):
    src = tmp_path / "gpt2ish"
    src.mkdir()
    for f in ("model.safetensors", "tokenizer.model"):
        (src / f).write_bytes((models["llama"] / f).read_bytes())
    cfg = json.loads((models["llama"] / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (src / "config.json").write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["convert", "-m", str(src), "-o", str(tmp_path / "x.gguf")])
    assert res.exit_code == 2
    assert "GPT2LMHeadModel" in res.stderr and "--generic" in res.stderr
    assert not (tmp_path / "x.gguf").exists()
    art = convert_model(src, tmp_path / "g.gguf", "f16", generic=True)
    assert "model.layers.0.self_attn.q_proj.weight" in art.tensor_types
    assert art.tensor_types["model.layers.0.input_layernorm.weight"] == "F32"
    kvs, _ = _gguf(tmp_path / "g.gguf")
    assert not any(k[0].startswith("tokenizer.") for k in kvs)


def test_gguf_source_and_unknown_bpe_are_refused(models, tmp_path):
    f16 = tmp_path / "m.gguf"
    convert_model(models["llama"], f16)
    with pytest.raises(CheckpointError, match="already a GGUF"):
        convert_model(f16, tmp_path / "again.gguf")
    src = tmp_path / "bpe"
    src.mkdir()
    for f in models["qwen2"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\p{L}+|\p{N}+|\s+|[^\s\p{L}\p{N}]+"
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(CheckpointError, match="not recognized .chkhsh [0-9a-f]{64}"):
        convert_model(src, tmp_path / "u.gguf")
    art = convert_model(src, tmp_path / "u.gguf", tokenizer_pre="gpt2")
    assert art.recipe.precision == "convert:f16:pre=gpt2"
    assert _kv(tmp_path / "u.gguf", "tokenizer.ggml.pre") == "gpt2"
    assert _kv(tmp_path / "u.gguf", "quantgate.tokenizer_pre_source") == "override"


@pytest.mark.slow
def test_reference_model_same_file_as_convert_hf_to_gguf(tmp_path):
    reference = Path(__file__).resolve().parents[2] / "models" / "reference"
    script = require_llamacpp_src() / "convert_hf_to_gguf.py"
    ref = tmp_path / "ref.gguf"
    subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(script), "", str(reference),
                    "--outfile", str(ref), "--outtype", "f16"], check=True, capture_output=True)
    ours = tmp_path / "ours.gguf"
    convert_model(reference, ours, "f16")
    assert _gguf(ours) == _gguf(ref)


def test_model_card_metadata_arrays(models, tmp_path):
    src = tmp_path / "carded"
    src.mkdir()
    for f in models["llama"].iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    (src / "README.md").write_text("---\nlicense: mit\nlanguage:\n- en\ntags:\n- tiny\n- test\n---\n# tiny\n")
    convert_model(src, tmp_path / "m.gguf")
    assert _kv(tmp_path / "m.gguf", "general.tags") == ["tiny", "test"]
    assert _kv(tmp_path / "m.gguf", "general.languages") == ["en"]


def test_cold_fingerprint_computed_in_the_convert_pass(tmp_path, monkeypatch):
    """Uncached, convert digests the tensors as it reads them (one read of the source) and fills the header in after
    the last tensor: same bytes and recorded SHA-256 as a conversion with the fingerprint cached."""
    import hashlib

    from quant.fingerprint import weights_fingerprint

    hf = make_tiny_model(tmp_path / "hf", "llama", seed=5)
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cold"))
    cold = convert_model(hf, tmp_path / "cold.gguf", "f16")
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "ref"))
    want = weights_fingerprint(hf)
    warm = convert_model(hf, tmp_path / "warm.gguf", "f16")
    data = (tmp_path / "cold.gguf").read_bytes()
    assert data == (tmp_path / "warm.gguf").read_bytes() and cold.sha256 == warm.sha256
    assert cold.sha256 == hashlib.sha256(data).hexdigest() and want.encode() in data
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cold"))
    assert weights_fingerprint(hf) == want  # cached by the convert pass
