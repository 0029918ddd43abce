"""The architectures beyond Llama/Qwen2 (MoE: Mixtral, Qwen2-MoE, Qwen3-MoE; dense: Qwen3, Phi-3 with and without
LongRoPE, Gemma 2, Gemma 3 text-only and multimodal), each proven on a tiny random transformers 5 model against
llama.cpp itself:

- `quantgate convert` writes the same file as the pinned convert_hf_to_gguf.py (KVs in order with types and
  values, tensor names, order, types, shapes and bytes; experts stacked 3-D as the converter stacks them);
- every named mix quantized straight from the HF folder equals llama_model_quantize's output from the converter's
  F16 file, type and bytes of every tensor (n_expert == 8 rules, 3-D experts quantized per 2-D slice), and with an
  importance matrix that has one column vector per expert;
- the converted F16 GGUF runs in llama-cpp-python with transformers' float32 logits, a Q4_K_M one generates;
- GGUF -> HF gives back the checkpoint's tensors (experts un-stacked), its weights fingerprint and, in the torch
  backend, its logits; `quantgate evaluate` scores a quantized MoE GGUF;
- config.json as the original checkpoints ship it (Phi-3-mini-128k's rope_scaling, Gemma 3 4B's sparse
  text_config) converts as the converter converts it; `quantgate verify` passes; hostile LongRoPE factors refused.

The pinned converter runs once per architecture (module fixture)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import CheckpointError
from core.records import QuantizeRequest
from quant.mixes import LOWBIT_FTYPES, PRECISIONS
from quantgate.convert import convert_model
from quantgate.pipeline import quantize_model
from tests.conftest import require_llamacpp_src
from tests.quantgate.test_convert import _RUN_CONVERTER, _gguf
from tests.quantgate.test_llamacpp_runtime import _compare_logits, _greedy
from tests.quantgate.test_pipeline_llamacpp import _assert_same, _llama_quantize, _tensors
from tests.quantgate.tiny_hf import make_tiny_model

ARCHS = ("mixtral", "qwen2moe", "qwen3", "qwen3moe", "phi3", "phi3longrope", "gemma2", "gemma3", "gemma3mm")
GGUF_ARCH = {"mixtral": "llama", "qwen2moe": "qwen2moe", "qwen3": "qwen3", "qwen3moe": "qwen3moe", "phi3": "phi3",
             "phi3longrope": "phi3", "gemma2": "gemma2", "gemma3": "gemma3", "gemma3mm": "gemma3"}
#: variants of phi3 / gemma3 (LongRoPE; the multimodal checkpoint): their own config tests, one mix each
VARIANTS = ("phi3longrope", "gemma3mm")
MOE = ("mixtral", "qwen2moe", "qwen3moe")
#: dense architectures: the mixes whose rules differ most (all 17 were compared by hand, docs/DECISIONS.md); MoE
#: architectures run every mix (their expert rules are new)
DENSE_MIXES = ("Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_S")


def _run_converter(script: Path, hf: Path, ref: Path, pre: str = "") -> None:
    """The pinned convert_hf_to_gguf.py on `hf`, F16, to `ref`."""
    subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(script), pre, str(hf), "--outfile", str(ref),
                    "--outtype", "f16"], check=True, capture_output=True)


def _assert_same_file(ours: Path, ref: Path):
    """Every KV (names in order, types, values) and every tensor (names, order, types, shapes, bytes) equal; returns
    ours as (kvs, tensors)."""
    (kv_a, t_a), (kv_b, t_b) = _gguf(ours), _gguf(ref)
    assert [k[0] for k in kv_a] == [k[0] for k in kv_b]
    assert [k[0] for k in kv_a if k not in kv_b] == []  # same types and values
    assert [t[:3] for t in t_a] == [t[:3] for t in t_b]  # names, order, types, shapes
    assert [t[0] for t in t_a if t not in t_b] == []  # bytes
    return kv_a, t_a


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """arch -> (tiny HF folder, the pinned converter's F16 GGUF of it)."""
    script = require_llamacpp_src() / "convert_hf_to_gguf.py"
    d = tmp_path_factory.mktemp("archs")
    out = {}
    for i, arch in enumerate(ARCHS):
        hf = make_tiny_model(d / arch, arch, seed=20 + i)
        ref = d / f"{arch}-ref-F16.gguf"
        pre = "qwen2" if arch.startswith("qwen") else ""  # our tiny BPE has no known chkhsh: what our regex rule says
        _run_converter(script, hf, ref, pre)
        out[arch] = (hf, ref)
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_same_file_as_convert_hf_to_gguf(converted, tmp_path, arch):
    hf, ref = converted[arch]
    ours = tmp_path / "ours.gguf"
    art = convert_model(hf, ours, "f16")
    kv_a, t_a = _assert_same_file(ours, ref)
    kv = {k[0] for k in kv_a}
    assert f"{GGUF_ARCH[arch]}.block_count" in kv
    if arch.endswith("moe") or arch == "mixtral":
        n_exp = 8 if arch != "qwen2moe" else 4
        assert art.tensor_types["blk.0.ffn_gate_inp.weight"] == "F32"  # the router stays F32, as the converter keeps it
        assert next(t for t in t_a if t[0] == "blk.1.ffn_down_exps.weight")[2] == (256, 256, n_exp)
        assert {f"{GGUF_ARCH[arch]}.expert_count", f"{GGUF_ARCH[arch]}.expert_used_count"} <= kv
    if arch == "qwen2moe":
        assert art.tensor_types["blk.0.ffn_gate_inp_shexp.weight"] == "F32"
        assert "qwen2moe.expert_shared_feed_forward_length" in kv
    if arch.startswith("qwen3"):
        assert art.tensor_types["blk.0.attn_q_norm.weight"] == "F32"
    if arch.startswith("gemma"):  # norms stored as 1 + w (the tiny model's w are 0), no output.weight (tied)
        norm = next(t for t in t_a if t[0] == "blk.0.post_ffw_norm.weight")
        assert np.array_equal(np.frombuffer(norm[3], np.float32), np.ones(256, np.float32))
        assert "output.weight" not in art.tensor_types and art.tensor_types["token_embd.weight"] == "F16"
        assert f"{GGUF_ARCH[arch]}.attention.sliding_window" in kv
    if arch == "gemma2":
        assert {"gemma2.attn_logit_softcapping", "gemma2.final_logit_softcapping"} <= kv
    if arch.startswith("gemma3"):
        assert {"gemma3.rope.freq_base_swa", "gemma3.attention.key_length"} <= kv
    if arch == "gemma3mm":  # the text model only: the SigLIP tower and the projector are not in the file
        assert len(t_a) == 28 and not any(t[0].startswith(("v.", "mm.")) for t in t_a)
    if arch == "phi3longrope":  # the LongRoPE factors first (generate_extra_tensors), the attention factor 2nd KV
        assert [(t[0], t[1], t[2]) for t in t_a[:2]] == [("rope_factors_long.weight", "F32", (32,)),
                                                        ("rope_factors_short.weight", "F32", (32,))]
        assert kv_a[1][0] == "phi3.rope.scaling.attn_factor"
        assert art.tensor_types["rope_factors_long.weight"] == "F32"
    if arch.startswith("phi3"):  # fused projections kept fused, as llama.cpp's phi3 graph reads them
        shapes = {t[0]: t[2] for t in t_a}
        assert shapes["blk.0.attn_qkv.weight"] == (256, 256 + 2 * 128) and shapes["blk.0.ffn_up.weight"] == (256, 1024)
        assert {"phi3.rope.scaling.original_context_length", "phi3.attention.sliding_window"} <= kv


def _every_mix(hf: Path, ref_f16: Path, tmp_path: Path, mixes) -> None:
    for mix in mixes:
        info = PRECISIONS[mix]
        ref, ours = tmp_path / f"ref-{mix}.gguf", tmp_path / f"ours-{mix}.gguf"
        _llama_quantize(ref_f16, ref, info.llama_ftype)
        quantize_model(QuantizeRequest(source=hf, out=ours, precision=mix), record=False)
        _assert_same(ours, ref)
        ref.unlink()
        ours.unlink()


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ARCHS)
def test_every_mix_matches_llama_model_quantize(require_oracle, converted, tmp_path, arch):
    """MoE: every K-quant/legacy mix; dense: DENSE_MIXES. (The i-quant/ternary file types need an importance
    matrix and are compared on MoE models in tests/quant/test_mixes_lowbit.py and test_pipeline_lowbit.py.)"""
    hf, ref_f16 = converted[arch]
    mixes = [m for m in PRECISIONS if m not in LOWBIT_FTYPES]
    # the LongRoPE / multimodal variants share every weight rule with phi3 / gemma3: one mix each (CI time)
    _every_mix(hf, ref_f16, tmp_path, mixes if arch in MOE else ("Q4_K_M",) if arch in VARIANTS else DENSE_MIXES)


def _expert_imatrix(f16: Path, seed: int):
    """A random importance matrix with llama-imatrix's layout: per tensor one column vector per expert."""
    from gguf import GGUFReader

    from quant.imatrix import Imatrix, ImatrixEntry

    rng = np.random.default_rng(seed)
    entries = {}
    for t in GGUFReader(f16).tensors:
        if t.name.endswith(".weight") and t.tensor_type.name == "F16" and "token_embd" not in t.name:
            cols = int(t.shape[0])
            n_mat = int(t.shape[2]) if len(t.shape) > 2 else 1
            counts = rng.integers(5, 60, n_mat).astype(np.float32)
            sums = (rng.gamma(0.5, 2.0, n_mat * cols) * np.repeat(counts, cols)).astype(np.float32)
            entries[t.name] = ImatrixEntry(sums=sums, counts=counts)
    return Imatrix(entries=entries, datasets=["test"], chunk_count=1, chunk_size=512)


@pytest.mark.oracle
@pytest.mark.parametrize("arch,mix", [("mixtral", "Q4_K_M"), ("qwen2moe", "Q2_K"), ("qwen3moe", "Q4_0")])
def test_imatrix_per_expert_matches_llama_model_quantize(require_oracle, converted, tmp_path, arch, mix):
    from quant.imatrix import save_imatrix_gguf

    hf, ref_f16 = converted[arch]
    imat = _expert_imatrix(ref_f16, seed=3)
    assert any(e.counts.size > 1 for e in imat.entries.values())
    ipath = tmp_path / "imatrix.gguf"
    save_imatrix_gguf(imat, ipath)
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    _llama_quantize(ref_f16, ref, PRECISIONS[mix].llama_ftype, imatrix={n: imat.values(n) for n in imat.entries})
    quantize_model(QuantizeRequest(source=ref_f16, out=ours, precision=mix, imatrix=ipath), record=False)
    _assert_same(ours, ref)
    plain = tmp_path / "plain.gguf"  # the imatrix did change the expert bytes (the test can fail)
    _llama_quantize(ref_f16, plain, PRECISIONS[mix].llama_ftype)
    assert _tensors(plain)["blk.0.ffn_up_exps.weight"][1] != _tensors(ref)["blk.0.ffn_up_exps.weight"][1]


@pytest.mark.oracle
@pytest.mark.parametrize("arch", ARCHS)
def test_runs_in_llama_cpp(require_oracle, converted, tmp_path, arch):
    hf, _ = converted[arch]
    f16 = tmp_path / "ours-F16.gguf"
    convert_model(hf, f16, "f16")
    res = _compare_logits(hf, f16, label=f"tiny-{arch}")
    assert res["tokenization_mismatches"] == []
    assert res["top1_agreement"] >= 0.99, res
    assert res["max_abs_logit_diff"] < 0.05, res


@pytest.mark.oracle
@pytest.mark.parametrize("arch", MOE + ("phi3", "phi3longrope"))
def test_quantized_generates_in_llama_cpp(require_oracle, converted, tmp_path, arch):
    hf, _ = converted[arch]
    q = tmp_path / "q4km.gguf"
    quantize_model(QuantizeRequest(source=hf, out=q, precision="Q4_K_M"), record=False)
    assert len(_greedy(q, "The model runs")) == 12


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_incomplete_or_foreign_experts_are_refused(converted, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf, _ = converted["mixtral"]
    bad = _copy(hf, tmp_path / "missing")
    w = load_file(bad / "model.safetensors")
    del w["model.layers.1.block_sparse_moe.experts.7.w2.weight"]
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="incomplete experts"):
        convert_model(bad, tmp_path / "x.gguf")
    bad = _copy(hf, tmp_path / "extra")
    w = load_file(bad / "model.safetensors")
    w["model.layers.0.block_sparse_moe.experts.8.w1.weight"] = w["model.layers.0.block_sparse_moe.experts.0.w1.weight"]
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="not one of 8 experts"):
        convert_model(bad, tmp_path / "x.gguf")
    bad = _copy(hf, tmp_path / "shape")
    w = load_file(bad / "model.safetensors")
    e3 = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    w[e3] = w[e3][:128]
    save_file(w, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="cannot be stacked"):
        convert_model(bad, tmp_path / "x.gguf")
    bad = _copy(hf, tmp_path / "count")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["num_local_experts"] = True
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="num_local_experts"):
        convert_model(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("arch", [a for a in ARCHS if a != "gemma3mm"])
def test_gguf_maps_back_to_the_checkpoint_and_runs_in_torch(converted, arch):
    """The converter's F16 GGUF -> HF: the checkpoint's own tensors (experts un-stacked to their per-expert names),
    the same weights fingerprint, and the torch backend gives the HF folder's logits exactly."""
    from safetensors.numpy import load_file

    from quant.fingerprint import weights_fingerprint
    from quant.gguf_to_hf import gguf_to_hf
    from runtime.backends.torch_backend import TorchBackend

    hf, ref = converted[arch]
    original = load_file(str(hf / "model.safetensors"))
    cfg, sd = gguf_to_hf(ref)
    src_cfg = json.loads((hf / "config.json").read_text())
    assert cfg["architectures"] == src_cfg["architectures"]
    tied = src_cfg.get("tie_word_embeddings", False)
    assert set(sd) == set(original) - ({"lm_head.weight"} if tied else set())
    assert [n for n, a in original.items() if n in sd and not np.array_equal(sd[n], a.astype(np.float32))] == []
    assert weights_fingerprint(hf) == weights_fingerprint(ref)
    ids = [[3, 17, 250, 499, 42, 7, 300, 11, 64, 128]]
    if arch == "phi3longrope":  # the factors come back as config; past original_max_position_embeddings (256)
        rope = src_cfg["rope_parameters"]  # transformers switches to the long factors: both sets are exercised
        assert [cfg["rope_parameters"][k] for k in ("rope_type", "long_factor", "short_factor")] == [
            "longrope", *[np.float32(rope[k]).tolist() for k in ("long_factor", "short_factor")]]
        ids.append([(7 * i) % 500 + 3 for i in range(300)])
    a, b = TorchBackend.load(hf), TorchBackend.load(ref)
    for seq in ids:
        assert np.array_equal(a.logits([seq])[0], b.logits([seq])[0])


def test_multimodal_gemma3_maps_back_to_its_text_model(converted):
    """Gemma3ForConditionalGeneration's GGUF holds the text model (the converter drops the vision tower): it maps
    back to Gemma3ForCausalLM with the language model's own weights, the same fingerprint, and the same logits as
    the multimodal checkpoint gives for text-only input."""
    import torch
    import transformers
    from safetensors.numpy import load_file

    from quant.fingerprint import weights_fingerprint
    from quant.gguf_to_hf import gguf_to_hf
    from runtime.backends.torch_backend import TorchBackend

    hf, ref = converted["gemma3mm"]
    original = load_file(str(hf / "model.safetensors"))
    # saved under the original checkpoints' names (language_model.model.*; newer saves: model.language_model.*)
    text = {"model." + n.split("model.", 2)[-1] if n.startswith("language_model.") else
            n.replace("model.language_model.", "model.", 1): a for n, a in original.items()
            if n.startswith(("language_model.", "model.language_model."))}
    cfg, sd = gguf_to_hf(ref)
    assert cfg["architectures"] == ["Gemma3ForCausalLM"] and cfg["model_type"] == "gemma3_text"
    assert set(sd) == set(text)
    assert [n for n, a in text.items() if not np.array_equal(sd[n], a.astype(np.float32))] == []
    assert weights_fingerprint(hf) == weights_fingerprint(ref)
    ids = [3, 17, 250, 499, 42, 7, 300, 11, 64, 128]
    mm = transformers.Gemma3ForConditionalGeneration.from_pretrained(hf, dtype=torch.float32).eval()
    with torch.no_grad():
        want = mm(input_ids=torch.tensor([ids])).logits[0].numpy()
    got = TorchBackend.load(ref).logits([ids])[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_quantgate_evaluate_on_a_moe_gguf(converted, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from quantgate.cli import app
    from tests.validation._tiny import write_samples

    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cache"))
    hf, _ = converted["qwen2moe"]
    q = tmp_path / "q4km.gguf"
    quantize_model(QuantizeRequest(source=hf, out=q, precision="Q4_K_M"), record=False)
    data = write_samples(tmp_path / "eval.jsonl", seed=2, n=3)
    out = tmp_path / "report.json"
    res = CliRunner().invoke(app, ["evaluate", "--baseline", str(hf), "--candidate", str(q), "--dataset", str(data),
                                   "--max-tokens", "32", "--json", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    d = json.loads(out.read_text())
    assert d["n_samples"] == 3 and 0 < d["overall"]["kl_mean"] < 1 and d["backend"] == "torch"


def _original_style_config(arch: str, cfg: dict) -> dict:
    """The tiny model's config.json rewritten as the published checkpoints write theirs (pre-transformers-5 keys,
    keys left to the config class's defaults)."""
    if arch == "phi3longrope":  # Phi-3-mini-128k-instruct: rope_scaling with "type", rope_theta at the top level
        rope = cfg.pop("rope_parameters")
        cfg["rope_scaling"] = {"type": "longrope", "long_factor": rope["long_factor"],
                               "short_factor": rope["short_factor"]}
        cfg["rope_theta"] = rope["rope_theta"]
        return cfg
    # Gemma 3 4B-it: text_config names few keys; rope_scaling linear (global layers), the rest is default
    text = cfg["text_config"]
    keep = ("hidden_size", "intermediate_size", "model_type", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "query_pre_attn_scalar", "sliding_window", "vocab_size")
    cfg["text_config"] = {k: text[k] for k in keep} | {"rope_scaling": {"factor": 8.0, "rope_type": "linear"}}
    return cfg


@pytest.mark.parametrize("arch", VARIANTS)
def test_original_style_config_same_file_as_convert_hf_to_gguf(converted, tmp_path, arch):
    script = require_llamacpp_src() / "convert_hf_to_gguf.py"
    hf = _copy(converted[arch][0], tmp_path / arch)
    cfg = _original_style_config(arch, json.loads((hf / "config.json").read_text()))
    (hf / "config.json").write_text(json.dumps(cfg))
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    _run_converter(script, hf, ref)
    convert_model(hf, ours, "f16")
    kv_a, t_a = _assert_same_file(ours, ref)
    keys = {k[0] for k in kv_a}
    if arch == "gemma3mm":  # the defaults the converter's AutoConfig fills in, and the linear scaling
        assert {"gemma3.rope.scaling.type", "gemma3.rope.scaling.factor", "gemma3.rope.freq_base_swa"} <= keys
    else:
        assert "phi3.rope.scaling.attn_factor" in keys


@pytest.mark.parametrize("arch", VARIANTS)
def test_quantgate_verify_passes(converted, tmp_path, arch):
    from typer.testing import CliRunner

    from quantgate.cli import app

    hf, ref = converted[arch]
    q = tmp_path / "q4km.gguf"
    quantize_model(QuantizeRequest(source=hf, out=q, precision="Q4_K_M"), record=False)
    runner = CliRunner()
    for path in (ref, q):
        res = runner.invoke(app, ["verify", str(path)])
        assert res.exit_code == 0, res.output


@pytest.mark.parametrize("edit,match", [
    ({"long_factor": [1.0] * 31}, "long_factor must be 32"),
    ({"short_factor": [1.0] * 31 + [float("nan")]}, "short_factor must be 32"),
    ({"short_factor": [1.0] * 31 + [0.0]}, "short_factor must be 32"),
    ({"long_factor": ["1.0"] * 32}, "long_factor must be 32"),
    ({"short_factor": None}, "short_factor must be 32"),
    ({"rope_type": "default"}, "needs rope type longrope"),
])
def test_hostile_longrope_factors_are_refused(converted, tmp_path, edit, match):
    hf = _copy(converted["phi3longrope"][0], tmp_path / "bad")
    cfg = json.loads((hf / "config.json").read_text())
    cfg["rope_parameters"].update(edit)
    (hf / "config.json").write_text(json.dumps(cfg).replace("NaN", "NaN"))
    with pytest.raises(CheckpointError, match=match):
        convert_model(hf, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_llama3_rope_scaling_same_file_as_convert_hf_to_gguf(tmp_path):
    """Llama 3.1/3.2's rope_scaling (as their config.json writes it): the converter's rope_freqs tensor (all three
    wavelength regimes with head_dim 64 and theta 500000) first, byte for byte; llama.cpp applies it as
    transformers does."""
    script = require_llamacpp_src() / "convert_hf_to_gguf.py"
    hf = make_tiny_model(tmp_path / "llama31", "llama", seed=5)
    cfg = json.loads((hf / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg |= {"rope_theta": 500000.0, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                      "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    (hf / "config.json").write_text(json.dumps(cfg))
    ref, ours = tmp_path / "ref.gguf", tmp_path / "ours.gguf"
    _run_converter(script, hf, ref)
    convert_model(hf, ours, "f16")
    kv_a, t_a = _assert_same_file(ours, ref)
    freqs = np.frombuffer(t_a[0][3], np.float32)
    assert t_a[0][0] == "rope_freqs.weight" and freqs.min() == 1.0 and freqs.max() == 8.0
    assert ((freqs > 1) & (freqs < 8)).any()
    from tests import ggml_oracle
    from tests.conftest import oracle_required
    if ggml_oracle.available() or oracle_required():
        res = _compare_logits(hf, ours, label="tiny-llama3-rope")
        assert res["top1_agreement"] >= 0.99 and res["max_abs_logit_diff"] < 0.05, res


@pytest.mark.parametrize("arch,tensor,needed", [
    ("qwen3", "blk.0.attn_k_norm.weight", "blk.0.attn_q_norm.weight"),
    ("qwen3moe", "blk.1.ffn_up_exps.weight", "blk.0.attn_q_norm.weight"),
    ("gemma2", "blk.0.post_attention_norm.weight", "blk.1.post_ffw_norm.weight"),
    ("gemma3", "blk.1.attn_q_norm.weight", "blk.0.post_attention_norm.weight"),
    ("phi3", "blk.0.ffn_up.weight", "blk.1.ffn_down.weight"),
    ("mixtral", "blk.0.ffn_gate_exps.weight", "blk.1.ffn_gate_inp.weight"),
    ("qwen2moe", "blk.0.ffn_down_shexp.weight", "blk.1.ffn_gate_inp_shexp.weight"),
    ("qwen2moe", "blk.1.ffn_gate_inp_shexp.weight", "blk.0.ffn_up_exps.weight"),
])
def test_verify_shape_checks_per_arch(converted, arch, tensor, needed):
    """Each converter architecture is shape-checked: the converter's file passes; one wrong shape, or a missing tensor
    a block needs, is a problem naming the tensor (shapes as llama.cpp's models/<arch>.cpp create_tensors)."""
    from quant.gguf_reader import read_gguf
    from quant.model_plan import CHECKED_ARCHS, check_architecture

    with read_gguf(converted[arch][1]) as g:
        kv = {k.key: k.value for k in g.kv}
        shapes = {t.name: tuple(t.shape) for t in g.tensors}
    arch = kv["general.architecture"]                    # mixtral is written as llama
    assert arch in CHECKED_ARCHS and check_architecture(arch, kv, shapes) == []
    bad = {**shapes, tensor: shapes[tensor][:-1] + (shapes[tensor][-1] + 1,)}
    problems = check_architecture(arch, kv, bad)
    assert len(problems) == 1 and repr(tensor) in problems[0] and "has shape" in problems[0]
    gone = {k: v for k, v in shapes.items() if k != needed}
    assert any(needed in p for p in check_architecture(arch, kv, gone))
