"""quant.mixes for the i-quant, ternary, MXFP4 and Q2_K_S file types: every tensor's type equals what llama.cpp's own
llama_model_quantize chooses, with and without an importance matrix, on dense, GQA, tied, MoE and fallback models.
Choosing types needs no kernels, so these run whatever quant's kernel table holds."""
from __future__ import annotations

import logging
from pathlib import Path

import gguf
import numpy as np
import pytest

from core.errors import CheckpointError
from quant.loaders.base import SourceTensor
from quant.mixes import LOWBIT_FTYPES, PRECISIONS, get_mix, tensor_types
from quant.model_plan import ModelPlan, PlannedTensor


class Cfg:
    """A tiny llama-arch model: n_expert > 0 makes it MoE (ffn_*_exps 3-D tensors, as Mixtral in llama.cpp)."""

    def __init__(self, n_layer, n_embd, n_ff, n_head, n_head_kv, vocab, tied, n_expert=0):
        self.n_layer, self.n_embd, self.n_ff, self.n_head, self.n_head_kv = n_layer, n_embd, n_ff, n_head, n_head_kv
        self.vocab, self.tied, self.n_expert = vocab, tied, n_expert

    def shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        e, f, hd = self.n_embd, self.n_ff, self.n_embd // self.n_head
        out = [("token_embd.weight", (self.vocab, e)), ("output_norm.weight", (e,))]
        if not self.tied:
            out.append(("output.weight", (self.vocab, e)))
        for i in range(self.n_layer):
            b = f"blk.{i}."
            out += [(b + "attn_norm.weight", (e,)), (b + "attn_q.weight", (e, e)),
                    (b + "attn_k.weight", (hd * self.n_head_kv, e)), (b + "attn_v.weight", (hd * self.n_head_kv, e)),
                    (b + "attn_output.weight", (e, e)), (b + "ffn_norm.weight", (e,))]
            if self.n_expert:
                x = self.n_expert
                out += [(b + "ffn_gate_inp.weight", (x, e)), (b + "ffn_gate_exps.weight", (x, f, e)),
                        (b + "ffn_up_exps.weight", (x, f, e)), (b + "ffn_down_exps.weight", (x, e, f))]
            else:
                out += [(b + "ffn_gate.weight", (f, e)), (b + "ffn_up.weight", (f, e)), (b + "ffn_down.weight", (e, f))]
        return out

    def dtype(self, name: str, shape) -> str:
        return "F32" if len(shape) == 1 or "ffn_gate_inp" in name else "F16"

    def write(self, path: Path) -> None:
        w = gguf.GGUFWriter(str(path), "llama")
        w.add_block_count(self.n_layer)
        w.add_context_length(128)
        w.add_embedding_length(self.n_embd)
        w.add_feed_forward_length(self.n_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_layer_norm_rms_eps(1e-5)
        w.add_vocab_size(self.vocab)
        w.add_rope_dimension_count(self.n_embd // self.n_head)
        if self.n_expert:
            w.add_expert_count(self.n_expert)
            w.add_expert_used_count(2)
        w.add_file_type(1)
        rng = np.random.default_rng(0)
        for name, shape in self.shapes():
            dt = np.float32 if self.dtype(name, shape) == "F32" else np.float16
            w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(dt))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    def plan(self) -> ModelPlan:
        def reader():
            raise AssertionError("type choice must not read data")

        tensors = [PlannedTensor(n, s, SourceTensor(n, s, self.dtype(n, s), reader)) for n, s in self.shapes()]
        hp = {"n_layer": self.n_layer, "n_embd": self.n_embd, "n_head": self.n_head, "n_head_kv": self.n_head_kv,
              "n_ff": self.n_ff, "n_vocab": self.vocab, "n_expert": self.n_expert}
        return ModelPlan(arch="llama", kv=[], tensors=tensors, hparams=hp, source_kind="gguf")

    def imatrix(self, skip: str | None = None) -> dict[str, np.ndarray]:
        """What llama-imatrix collects: every matmul weight (not token_embd), one value per column per expert."""
        rng = np.random.default_rng(5)
        out = {}
        for name, shape in self.shapes():
            if len(shape) < 2 or name in ("token_embd.weight", skip) or "ffn_gate_inp" in name:
                continue
            n = shape[-1] * (shape[0] if len(shape) == 3 else 1)
            out[name] = (rng.gamma(0.5, 2.0, n) + 1e-3).astype(np.float32)
        return out


CONFIGS = {
    "gqa8": Cfg(8, 256, 256, 8, 2, 256, False),          # n_gqa 4; 8 layers: n/8 = 1, use_more_bits pattern
    "tied_e320": Cfg(4, 320, 600, 8, 8, 256, True),      # rows of 320: 256-block types fall back; 600 % 32: F16
    "moe4": Cfg(2, 256, 256, 4, 4, 256, False, n_expert=4),  # n_expert >= 4 rules, MXFP4 experts, layer from name
    "moe8": Cfg(1, 256, 256, 4, 4, 256, False, n_expert=8),  # the n_expert == 8 rules
}
NEW_FTYPES = sorted(LOWBIT_FTYPES)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("lowbit_src")
    for key, cfg in CONFIGS.items():
        cfg.write(d / f"{key}.gguf")
    return {k: d / f"{k}.gguf" for k in CONFIGS}


def _llama(oracle, src: Path, ftype: str, imatrix=None, pure=False) -> dict[str, str] | None:
    """llama.cpp's types (its dry run), or None when its real run refuses for want of an importance matrix."""
    types, needs_imatrix = oracle.llama_quantize_types(src, PRECISIONS[ftype].llama_ftype, imatrix=imatrix,
                                                       pure=pure)
    return None if needs_imatrix else types


def _ours(cfg: Cfg, ftype: str, imatrix=None, pure=False) -> dict[str, str] | None:
    try:
        return tensor_types(cfg.plan(), ftype, pure=pure,
                            imatrix_names=None if imatrix is None else set(imatrix))
    except CheckpointError as e:
        assert "importance matrix" in str(e), e
        return None


def _compare(ours, ref, what: str) -> None:
    if ref is None or ours is None:
        assert ref is None and ours is None, f"{what}: llama.cpp refused={ref is None}, ours refused={ours is None}"
        return
    diff = {n: (ours.get(n), t) for n, t in ref.items() if ours.get(n) != t}
    assert not diff and set(ours) == set(ref), f"{what}: (ours, llama.cpp) {diff}"


@pytest.mark.oracle
@pytest.mark.parametrize("cfg_key", sorted(CONFIGS))
def test_every_new_file_type_with_imatrix(require_oracle, sources, cfg_key):
    cfg = CONFIGS[cfg_key]
    imat = cfg.imatrix()
    for ftype in NEW_FTYPES:
        ref = _llama(require_oracle, sources[cfg_key], ftype, imatrix=imat)
        assert ref is not None
        _compare(_ours(cfg, ftype, imatrix=imat), ref, f"{cfg_key} {ftype} imatrix")


@pytest.mark.oracle
@pytest.mark.parametrize("cfg_key", sorted(CONFIGS))
def test_every_new_file_type_without_imatrix(require_oracle, sources, cfg_key):
    """Without an imatrix llama.cpp picks other types (IQ3_XXS, IQ4_*, ffn_down) or refuses: so do we."""
    cfg = CONFIGS[cfg_key]
    refused = set()
    for ftype in NEW_FTYPES:
        ref = _llama(require_oracle, sources[cfg_key], ftype)
        _compare(_ours(cfg, ftype), ref, f"{cfg_key} {ftype} no imatrix")
        if ref is None:
            refused.add(ftype)
    if cfg_key == "gqa8":  # (on tied_e320 every very-low-bit tensor falls back to IQ4_NL: nothing needs one)
        # IQ3_XS needs one only for its IQ3_XXS tensors (attn_q/k, middle ffn), Q2_K_S for its Q2_K ones
        assert {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ3_XXS", "IQ3_XS", "Q2_K_S"} == refused
    assert not {"IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M", "TQ1_0", "TQ2_0", "MXFP4_MOE"} & refused


@pytest.mark.oracle
@pytest.mark.parametrize("ftype", ["IQ2_XXS", "IQ3_XS", "TQ1_0", "MXFP4_MOE", "IQ4_XS"])
def test_pure(require_oracle, sources, ftype):
    """--pure: the default type everywhere, then the fallbacks rows of 320 and 600 force."""
    cfg = CONFIGS["tied_e320"]
    imat = cfg.imatrix()
    ref = _llama(require_oracle, sources["tied_e320"], ftype, imatrix=imat, pure=True)
    _compare(_ours(cfg, ftype, imatrix=imat, pure=True), ref, f"{ftype} pure")


@pytest.mark.oracle
@pytest.mark.parametrize("cfg_key,ftype", [("gqa8", "TQ1_0"), ("gqa8", "Q2_K_S"), ("moe4", "MXFP4_MOE"),
                                           ("tied_e320", "TQ2_0")])
def test_dry_run_types_are_the_written_types(require_oracle, sources, tmp_path, cfg_key, ftype):
    """The oracle's dry run reports the types its real run writes (checked on the file types ggml quantizes fast)."""
    imat = CONFIGS[cfg_key].imatrix()
    out = tmp_path / "o.gguf"
    assert require_oracle.llama_model_quantize(sources[cfg_key], out, PRECISIONS[ftype].llama_ftype, imatrix=imat) == 0
    written = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert written == _llama(require_oracle, sources[cfg_key], ftype, imatrix=imat)


@pytest.mark.oracle
@pytest.mark.parametrize("imatrix", [False, True])
def test_refusals_match_the_real_run(require_oracle, sources, tmp_path, imatrix):
    """IQ1_M without an imatrix, or with one that lacks blk.0.attn_k (quantized before any IQ1_M tensor is
    produced): llama_model_quantize fails, and so does our planner, naming the tensor."""
    cfg = CONFIGS["gqa8"]
    imat = cfg.imatrix(skip="blk.0.attn_k.weight") if imatrix else None
    rc = require_oracle.llama_model_quantize(sources["gqa8"], tmp_path / "o.gguf", 31, imatrix=imat)
    assert rc != 0
    with pytest.raises(CheckpointError, match="blk.0.attn_k.weight" if imatrix else "IQ1_M requires an importance"):
        tensor_types(cfg.plan(), "IQ1_M", imatrix_names=None if imat is None else set(imat))


def test_enum_numbers_and_default_types():
    """llama.h's LLAMA_FTYPE numbers and llama_ftype_get_default_type, by hand from the pinned source."""
    want = {"IQ2_XXS": (19, "IQ2_XXS"), "IQ2_XS": (20, "IQ2_XS"), "Q2_K_S": (21, "Q2_K"), "IQ3_XS": (22, "IQ3_S"),
            "IQ3_XXS": (23, "IQ3_XXS"), "IQ1_S": (24, "IQ1_S"), "IQ4_NL": (25, "IQ4_NL"), "IQ3_S": (26, "IQ3_S"),
            "IQ3_M": (27, "IQ3_S"), "IQ2_S": (28, "IQ2_XS"), "IQ2_M": (29, "IQ2_S"), "IQ4_XS": (30, "IQ4_XS"),
            "IQ1_M": (31, "IQ1_M"), "TQ1_0": (36, "TQ1_0"), "TQ2_0": (37, "TQ2_0"), "MXFP4_MOE": (38, "MXFP4")}
    assert {k: (PRECISIONS[k].llama_ftype, PRECISIONS[k].default_type) for k in LOWBIT_FTYPES} == want
    assert get_mix("iq2_xxs").name == "IQ2_XXS" and get_mix(" mxfp4_moe ").llama_ftype == 38


def test_rules_from_the_c_source(caplog):
    """Hand-checked against llama-quant.cpp (gqa8: n_gqa 4, 8 layers; tied_e320: rows of 320 and 600)."""
    t = tensor_types(CONFIGS["gqa8"].plan(), "IQ2_XXS", has_imatrix=True)
    assert t["output.weight"] == "Q5_K" and t["token_embd.weight"] == "Q2_K"
    assert t["blk.0.attn_v.weight"] == "Q4_K"                        # n_gqa >= 4
    assert t["blk.0.ffn_down.weight"] == "Q2_K" and t["blk.1.ffn_down.weight"] == "IQ2_XXS"  # i < n/8
    m = tensor_types(CONFIGS["gqa8"].plan(), "IQ3_XS", has_imatrix=True)
    assert m["blk.0.attn_q.weight"] == "IQ3_XXS" and m["blk.0.ffn_up.weight"] == "IQ3_S"   # layer 0 < n/8
    assert m["blk.1.ffn_up.weight"] == "IQ3_XXS" and m["blk.7.ffn_gate.weight"] == "IQ3_S"  # [n/8, 7n/8)
    x = tensor_types(CONFIGS["moe4"].plan(), "MXFP4_MOE")
    assert x["blk.0.ffn_down_exps.weight"] == "MXFP4" and x["blk.0.attn_q.weight"] == "Q8_0"
    assert x["token_embd.weight"] == "Q8_0" and x["blk.0.ffn_gate_inp.weight"] == "F32"
    with caplog.at_level(logging.WARNING, logger="quant.mixes"):
        f = tensor_types(CONFIGS["tied_e320"].plan(), "IQ2_S", has_imatrix=True)
    assert f["blk.0.attn_q.weight"] == "IQ4_NL" and f["blk.0.ffn_down.weight"] == "F16"  # 320 % 256, 600 % 32
    assert f["token_embd.weight"] == "Q8_0"  # tied, output rule: 320 is not a multiple of IQ2_XS's 256
    assert "tensor(s) required fallback quantization" in caplog.text
    with pytest.raises(CheckpointError, match="IQ1_S requires an importance matrix"):
        tensor_types(CONFIGS["gqa8"].plan(), "IQ1_S")
