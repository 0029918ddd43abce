"""Sensitivity profiles: the error estimate's definition, candidates, JSON report, policies on a real profile,
and `--precision auto` files (types, file type, metadata, reproducibility, llama.cpp loading)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tests.analyzer.conftest import CHUNK, MEASURE, TYPES


def test_estimate_is_the_imatrix_weighted_relative_error(tiny_profile, tiny_model, cache_dir, calib_jsonl):
    from safetensors.numpy import load_file

    import quant
    from analyzer.cache import CalibrationCache
    from analyzer.profile import cached_imatrix
    from core.version import __version__

    with CalibrationCache(cache_dir) as cache:
        imat = cached_imatrix(tiny_model, calib_jsonl, tiny_profile.model["sha256"], chunk_size=CHUNK, n_chunks=None,
                              cache=cache, tool_version=__version__, matmul_dtype=tiny_profile.imatrix["matmul"])
    x = load_file(str(tiny_model / "model.safetensors"))["model.layers.0.mlp.down_proj.weight"].astype(np.float32)
    w = imat.values("blk.0.ffn_down.weight").astype(np.float64)
    xq = quant.dequantize(quant.quantize(x, "Q4_K", imatrix=imat.values("blk.0.ffn_down.weight")), "Q4_K", x.shape)
    want = (w * (x.astype(np.float64) - xq) ** 2).sum() / (w * x.astype(np.float64) ** 2).sum()
    tp = next(t for t in tiny_profile.tensors if t.name == "blk.0.ffn_down.weight")
    assert tp.candidates["Q4_K"].est_error == pytest.approx(want, rel=1e-9)
    assert tp.candidates["Q4_K"].size_bytes == quant.formats.get_qtype("Q4_K").nbytes(x.shape)
    assert tp.candidates["F16"].est_error == 0.0  # an F16 source loses nothing at F16
    assert tp.candidates["Q4_K"].est_error > tp.candidates["Q8_0"].est_error > 0


def test_profile_covers_quantizable_tensors_and_validates_the_estimate(tiny_profile, tmp_path):
    from analyzer.profile import Profile

    q = [t for t in tiny_profile.tensors if t.quantizable]
    assert {t.name for t in tiny_profile.tensors if not t.quantizable} >= {"output_norm.weight"}
    assert len(q) == 16 and all(list(t.candidates) == list(TYPES) for t in q)
    assert tiny_profile.measure["mode"] == "stream"
    head = next(t for t in q if t.name == "output.weight")  # the head is measured exactly, the rest per block
    assert head.candidates["Q4_K"].measured_kld > 0 and head.candidates["Q4_K"].measured_mse > 0
    assert all(t.candidates["Q4_K"].block_err > 0 and t.gain > 0 for t in q if t is not head)
    assert all(s.predicted == pytest.approx(t.gain * s.block_err) for t in q if t is not head
               for s in t.candidates.values())
    v = tiny_profile.validation
    assert v["block_pairs"] == 15 * 2 and -1 <= v["est_vs_block_err_all"] <= 1  # Q4_K and Q8_0 of every tensor
    assert v["est_vs_block_err_all"] > 0.5  # coarser types do more damage: the estimate ranks that right
    tiny_profile.save(tmp_path / "p.json")
    back = Profile.load(tmp_path / "p.json")
    assert back.to_json() == tiny_profile.to_json()


def test_several_candidate_sets_share_one_cache(tiny_profile, tiny_model, calib_jsonl, cache_dir):
    from analyzer.cache import CalibrationCache
    from analyzer.profile import build_profile

    with CalibrationCache(cache_dir) as cache:
        sub = build_profile(tiny_model, calib_jsonl, chunk_size=CHUNK, candidate_types=("Q8_0",), cache=cache,
                            **MEASURE)
        assert sub.timings["computed_tensors"] == 0
        def raw(s):  # what was measured (the fitted gain, and so `predicted`, depends on the candidate set)
            return (s.size_bytes, s.est_error, s.measured_kld, s.measured_mse)

        assert all(raw(t.candidates["Q8_0"]) == raw(tiny_profile_by(tiny_profile, t.name).candidates["Q8_0"])
                   for t in sub.tensors if t.quantizable)
        new = build_profile(tiny_model, calib_jsonl, chunk_size=CHUNK, candidate_types=("Q6_K", "Q8_0"),
                            cache=cache, measure=False)  # no measurement: other keys, computed
        assert new.timings["computed_tensors"] == 16 and new.tensors[0].candidates["Q8_0"].measured_kld is None
        again = build_profile(tiny_model, calib_jsonl, chunk_size=CHUNK, candidate_types=TYPES, cache=cache,
                              **MEASURE)
        assert again.timings["computed_tensors"] == 0


def tiny_profile_by(prof, name):
    return next(t for t in prof.tensors if t.name == name)


def test_policies_on_a_profile(tiny_profile):
    import copy

    from analyzer.policy import BudgetPolicy, ThresholdPolicy
    from analyzer.profile import apply_policy

    p = apply_policy(copy.deepcopy(tiny_profile), ThresholdPolicy())
    assert all(t.chosen == "Q4_K" for t in p.tensors if t.quantizable)  # Q4_K's ~0.5% error is under 1%
    assert all(t.chosen == t.source_type for t in p.tensors if not t.quantizable)
    budgets = [580_000, 700_000, 900_000]
    errs = []
    for b in budgets:
        p = apply_policy(copy.deepcopy(tiny_profile), BudgetPolicy(b),
                         overrides=[(r"^output\.weight$", "Q8_0")])
        q_bytes = sum(t.size_of(t.chosen) for t in p.tensors if t.quantizable)
        assert q_bytes <= b
        out = tiny_profile_by(p, "output.weight")
        assert out.chosen == "Q8_0" and out.reason.startswith("override")
        assert p.overrides == [[r"^output\.weight$", "Q8_0"]] and p.policy["budget_bytes"] == b
        errs.append(p.summary["predicted_error"])
    assert errs == sorted(errs, reverse=True)


def test_auto_file_has_the_chosen_types_closest_file_type_and_policy(tiny_profile, tiny_model, tmp_path,
                                                                      cache_dir):
    import copy

    from analyzer.auto import auto_request, mix_sizes
    from quant.gguf_reader import read_gguf
    from quant.mixes import get_mix
    from quantgate.pipeline import quantize_model

    tiny_profile = copy.deepcopy(tiny_profile)
    tiny_profile.save(tmp_path / "p.json")
    arts = []
    for i in range(2):
        with auto_request(tiny_model, tmp_path / f"auto{i}.gguf", profile=tmp_path / "p.json", policy="budget",
                          target_bpw=5.0, cache_dir=cache_dir, profile_out=tmp_path / "chosen.json") as (req, plan):
            arts.append(quantize_model(req))
    a, b = arts
    assert a.sha256 == b.sha256  # the same profile + policy reproduces the file byte for byte
    assert a.bits_per_weight <= 5.0 and a.recipe.precision == "AUTO"
    assert a.file_type == get_mix(plan.file_type_mix).llama_ftype
    sizes = mix_sizes(tiny_model)
    total = sum(a.tensor_bytes.values())
    assert all(abs(sizes[plan.file_type_mix] - total) <= abs(s - total) for s in sizes.values())
    with read_gguf(a.path) as g:
        types = {t.name: t.qtype for t in g.tensors}
        kv = {k.key: k.value for k in g.kv}
    assert types == plan.type_map
    assert json.loads(kv["quantgate.tensor_types"]) == plan.type_map
    pol = json.loads(kv["quantgate.policy"])
    assert pol["policy"]["mode"] == "budget" and pol["policy"]["target"] == "bpw=5"
    assert pol["profile_sha256"] == plan.profile.sha256()
    import hashlib

    assert hashlib.sha256((tmp_path / "chosen.json").read_bytes()).hexdigest() == pol["profile_sha256"]
    assert kv["quantgate.imatrix_sha256"] == a.recipe.imatrix_sha256
    # the written profile reproduces the file without naming the policy again
    with auto_request(tiny_model, tmp_path / "again.gguf", profile=tmp_path / "chosen.json",
                      cache_dir=cache_dir) as (req, _):
        assert quantize_model(req).sha256 == a.sha256


def test_auto_refuses_a_profile_of_another_model(tiny_profile, tiny_model, tmp_path):
    import copy

    from analyzer.auto import auto_request
    from core.errors import QuantGateError

    p = copy.deepcopy(tiny_profile)
    p.model["sha256"] = "0" * 64
    p.save(tmp_path / "p.json")
    with pytest.raises(QuantGateError, match="made for model"):
        with auto_request(tiny_model, tmp_path / "x.gguf", profile=tmp_path / "p.json", policy="threshold"):
            pass


def test_row_lengths_that_do_not_fit_a_block_drop_those_types(tmp_path):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from analyzer.profile import build_profile
    from tests.validation._tiny import make_tiny_model, write_samples

    m = make_tiny_model(tmp_path / "m")
    cfg = LlamaConfig.from_pretrained(str(m))
    cfg.intermediate_size = 288  # ffn_down rows of 288: a multiple of 32, not of 256
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.float16).save_pretrained(str(m))
    prof = build_profile(m, write_samples(tmp_path / "c.jsonl", n=12), candidate_types=("Q4_K", "Q8_0", "F16"),
                         use_imatrix=False, measure=False)
    by = {t.name: t for t in prof.tensors}
    assert list(by["blk.0.ffn_down.weight"].candidates) == ["Q8_0", "F16"]
    assert list(by["blk.0.ffn_up.weight"].candidates) == ["Q4_K", "Q8_0", "F16"]


@pytest.mark.oracle
def test_auto_file_runs_in_llama_cpp(require_oracle, tiny_profile, tiny_model, tmp_path, cache_dir):
    import copy

    import llama_cpp

    from analyzer.auto import auto_request
    from quantgate.pipeline import quantize_model

    copy.deepcopy(tiny_profile).save(tmp_path / "p.json")
    with auto_request(tiny_model, tmp_path / "auto.gguf", profile=tmp_path / "p.json", policy="budget",
                      target_bpw=4.6, cache_dir=cache_dir) as (req, _):
        art = quantize_model(req)
    llm = llama_cpp.Llama(model_path=art.path, n_ctx=64, verbose=False, logits_all=True)
    toks = llm.tokenize(b"def return import class print", add_bos=True)
    llm.eval(toks)
    logits = np.array(llm.scores[:len(toks)])
    assert logits.shape == (len(toks), 320) and np.all(np.isfinite(logits))
    assert llm.metadata["general.file_type"] == str(art.file_type)


def test_cli_imatrix_profile_and_quantize_auto_within_a_target_size(tiny_model, calib_jsonl, cache_dir, tmp_path,
                                                                    tiny_profile):
    from typer.testing import CliRunner

    from quant.imatrix import load_imatrix
    from quantgate.cli import app

    run = CliRunner().invoke
    common = ["--model", str(tiny_model), "--calib", str(calib_jsonl), "--cache-dir", str(cache_dir),
              "--chunk-size", str(CHUNK)]
    r = run(app, ["imatrix", *common, "--out", str(tmp_path / "i.dat"), "--format", "dat"])
    assert r.exit_code == 0, r.output
    assert len(load_imatrix(tmp_path / "i.dat").entries) == 15
    (tmp_path / "ov.yaml").write_text("'blk\\.1\\.attn_v': Q8_0\n")
    r = run(app, ["profile", *common, "--out", str(tmp_path / "p.json"), "--types", ",".join(TYPES),
                  "--measure-seqs", "2", "--measure-len", "32", "--policy", "budget", "--target-size", "600KB",
                  "--overrides", str(tmp_path / "ov.yaml"), "--imatrix-out", str(tmp_path / "i.gguf"), "-q"])
    assert r.exit_code == 0, r.output
    prof = json.loads((tmp_path / "p.json").read_text())
    assert prof["overrides"] == [["blk\\.1\\.attn_v", "Q8_0"]] and prof["policy"]["target"] == "size=600KB"
    r = run(app, ["quantize", "--model", str(tiny_model), "--precision", "auto", "--profile", str(tmp_path / "p.json"),
                  "--imatrix", str(tmp_path / "i.gguf"), "--out", str(tmp_path / "a.gguf"), "--json"])
    assert r.exit_code == 0, r.output
    art = json.loads(r.stdout)
    assert art["nbytes"] <= 600_000 and (tmp_path / "a.gguf").stat().st_size == art["nbytes"]
    assert art["tensor_types"]["blk.1.attn_v.weight"] == "Q8_0"
    r = run(app, ["quantize", "--model", str(tiny_model), "--precision", "Q4_K_M", "--target-bpw", "4",
                  "--out", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "--precision auto" in r.output
    r = run(app, ["quantize", "--model", str(tiny_model), "--precision", "auto", "--profile", str(tmp_path / "p.json"),
                  "--tensor-type", "ffn=Q8_0", "--out", str(tmp_path / "y.gguf")])
    assert r.exit_code == 2 and "--overrides" in r.output


MOE_TYPES = ("Q4_K", "Q8_0")
MOE_ARCHS = ("mixtral", "qwen2moe", "qwen3moe")


@pytest.fixture(scope="module", params=MOE_ARCHS)
def moe_profile(request, tmp_path_factory, calib_jsonl, cache_dir):
    """(arch, tiny MoE HF folder, its profile, the imatrix it collected): fused experts measured in the exact mode
    (whole model, real router)."""
    from analyzer.cache import CalibrationCache
    from analyzer.profile import build_profile, cached_imatrix, imatrix_digest
    from core.version import __version__

    from tests.quantgate.tiny_hf import make_tiny_model

    hf = make_tiny_model(tmp_path_factory.mktemp("moe") / request.param, request.param, seed=11)
    with CalibrationCache(cache_dir) as cache:
        prof = build_profile(hf, calib_jsonl, chunk_size=CHUNK, n_chunks=3, candidate_types=MOE_TYPES, cache=cache,
                             **MEASURE)
        imat = cached_imatrix(hf, calib_jsonl, prof.model["sha256"], chunk_size=CHUNK, n_chunks=3, cache=cache,
                              tool_version=__version__, matmul_dtype=prof.imatrix["matmul"])
    assert imatrix_digest(imat) == prof.imatrix["digest"]
    return request.param, hf, prof, imat


def test_moe_profile_measures_fused_experts_shared_experts_and_keeps_the_router(moe_profile):
    """Every fused 3-D expert tensor gets each candidate applied to all its experts: exact bytes, the per-expert
    imatrix-weighted estimate, and the whole-model KLD with the real router (measure mode exact); the router
    (ffn_gate_inp) and qwen2moe's shared-expert gate stay unquantized as llama.cpp keeps them; shared experts are
    measured like dense tensors."""
    from analyzer.profile import _quant_dequant
    from analyzer.stream_measure import rel_weight_error
    from quant.formats import get_qtype

    arch, hf, prof, imat = moe_profile
    assert prof.measure["mode"] == "exact" and prof.imatrix["used"]
    by = {t.name: t for t in prof.tensors}
    experts = [t for t in prof.tensors if t.name.endswith("_exps.weight")]
    n_layer = 2
    assert len(experts) == 3 * n_layer and all(len(t.shape) == 3 for t in experts)
    for t in experts:
        assert t.quantizable and list(t.candidates) == list(MOE_TYPES), t.name
        for qt, st in t.candidates.items():
            assert st.size_bytes == get_qtype(qt).nbytes(tuple(t.shape)) == t.shape[0] * t.shape[1] * \
                get_qtype(qt).row_bytes(t.shape[2])
            assert st.est_error > 0 and st.measured_kld is not None and st.measured_kld >= 0
            assert st.measured_mse is not None and st.predicted is not None
        assert t.gain is not None and np.isfinite(t.gain) and t.gain > 0
    assert sum(t.candidates["Q4_K"].measured_kld for t in experts) > sum(t.candidates["Q8_0"].measured_kld
                                                                          for t in experts)
    for i in range(n_layer):
        r = by[f"blk.{i}.ffn_gate_inp.weight"]
        assert not r.quantizable and r.source_type == "F32" and not r.candidates
    if arch == "qwen2moe":
        assert not by["blk.0.ffn_gate_inp_shexp.weight"].quantizable
        sh = by["blk.1.ffn_down_shexp.weight"]
        assert sh.quantizable and all(s.measured_kld is not None for s in sh.candidates.values())
    # the estimate of a fused tensor: every expert's matrix with its own imatrix row (checked directly)
    t = by["blk.1.ffn_down_exps.weight"]
    w = imat.values(t.name).reshape(t.shape[0], t.shape[2])
    x = _gguf_tensor(hf, t.name)
    num = den = 0.0
    for e in range(t.shape[0]):
        xq = _quant_dequant(np.ascontiguousarray(x[e]), "Q4_K", w[e])
        num += float((((x[e].astype(np.float64) - xq) ** 2) @ w[e].astype(np.float64)).sum())
        den += float(((x[e].astype(np.float64) ** 2) @ w[e].astype(np.float64)).sum())
    assert t.candidates["Q4_K"].est_error == pytest.approx(num / den, rel=1e-9)
    assert rel_weight_error(x, _quant_dequant(x, "Q4_K", imat.values(t.name)), imat.values(t.name)) == \
        pytest.approx(num / den, rel=1e-9)


def _gguf_tensor(hf, name: str) -> np.ndarray:
    """One tensor of the model in the GGUF layout (float32), as the pipeline reads it."""
    from quant.loaders import open_checkpoint
    from quant.model_plan import plan_model

    with open_checkpoint(hf, allow_requantize=True) as ck:
        pt = next(t for t in plan_model(ck).tensors if t.name == name)
        x = pt.source.read()
        x = pt.transform(x) if pt.transform is not None else x
        return np.ascontiguousarray(x, dtype=np.float32)


def _moe_auto(moe_profile, tmp_path, cache_dir, target_bpw: float = 6.0):
    """The auto file of a MoE profile under a bits-per-weight budget (profile saved, then auto_request)."""
    import copy

    from analyzer.auto import auto_request
    from quantgate.pipeline import quantize_model

    arch, hf, prof, imat = moe_profile
    copy.deepcopy(prof).save(tmp_path / "p.json")
    with auto_request(hf, tmp_path / f"{arch}-auto.gguf", profile=tmp_path / "p.json", policy="budget",
                      target_bpw=target_bpw, cache_dir=cache_dir) as (req, plan):
        return quantize_model(req), plan


def test_moe_auto_file_holds_the_measured_types_and_what_was_measured(moe_profile, tmp_path, cache_dir):
    """--precision auto on a MoE model: the budget policy chooses the fused experts' types from their measured
    predictions and real byte sizes, within the bits-per-weight target; `gguf` reads back exactly those types, the
    router F32; each expert tensor dequantizes to the Q_T(W) the profile measured (per-expert imatrix slices, as
    llama-quantize applies them); verify passes."""
    import gguf

    from analyzer.profile import _quant_dequant
    from quant.verify import verify_gguf

    arch, hf, prof, imat = moe_profile
    art, plan = _moe_auto(moe_profile, tmp_path, cache_dir)
    assert art.bits_per_weight <= 6.0 and art.recipe.precision == "AUTO"
    r = gguf.GGUFReader(str(art.path))
    types = {t.name: t.tensor_type.name for t in r.tensors}
    assert types == plan.type_map
    chosen = {t.name: t for t in plan.profile.tensors}
    experts = [n for n in types if n.endswith("_exps.weight")]
    assert len(experts) == 6 and all(types[n] in MOE_TYPES for n in experts)
    assert all(chosen[n].reason and "override" not in chosen[n].reason for n in experts)
    assert {types[n] for n in plan.type_map if chosen[n].quantizable} == set(MOE_TYPES)  # the budget mixes both
    assert all(types[f"blk.{i}.ffn_gate_inp.weight"] == "F32" for i in range(2))
    by = {t.name: t for t in r.tensors}
    for name in ("blk.0.ffn_gate_exps.weight", "blk.1.ffn_down_exps.weight"):
        t = by[name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(chosen[name].shape)
        x = _gguf_tensor(hf, name)
        np.testing.assert_array_equal(got, _quant_dequant(x, types[name], imat.values(name)))
    rep = verify_gguf(art.path)
    assert rep.ok, rep.problems


@pytest.mark.oracle
def test_moe_auto_file_runs_in_llama_cpp(require_oracle, moe_profile, tmp_path, cache_dir):
    """llama.cpp loads each MoE auto file and evaluates it (finite logits, its file type)."""
    import llama_cpp

    art, _ = _moe_auto(moe_profile, tmp_path, cache_dir)
    llm = llama_cpp.Llama(model_path=str(art.path), n_ctx=64, verbose=False, logits_all=True)
    toks = llm.tokenize(b"def return import class print", add_bos=True)
    llm.eval(toks)
    logits = np.array(llm.scores[:len(toks)])
    assert logits.shape == (len(toks), 512) and np.all(np.isfinite(logits))
    assert llm.metadata["general.file_type"] == str(art.file_type)


def test_cli_profile_and_quantize_auto_on_a_moe_model(tmp_path, calib_jsonl, cache_dir):
    """`quantgate profile` + `quantgate quantize --precision auto` on a Qwen3-MoE checkpoint, and its F16 GGUF
    profiled the same way (same model identity and rows: one cache)."""
    from typer.testing import CliRunner

    from quantgate.cli import app
    from quantgate.convert import convert_model
    from tests.quantgate.tiny_hf import make_tiny_model

    hf = make_tiny_model(tmp_path / "q3", "qwen3moe", seed=12)
    convert_model(hf, tmp_path / "q3.gguf", "f16")
    run = CliRunner().invoke
    for src in (hf, tmp_path / "q3.gguf"):
        common = ["--model", str(src), "--calib", str(calib_jsonl), "--cache-dir", str(cache_dir),
                  "--chunk-size", str(CHUNK), "--chunks", "2"]
        r = run(app, ["profile", *common, "--out", str(tmp_path / "p.json"), "--types", "Q4_K,Q6_K",
                      "--measure-seqs", "2", "--measure-len", "32", "--policy", "budget", "--target-bpw", "5.5",
                      "--imatrix-out", str(tmp_path / "i.gguf"), "-q"])
        assert r.exit_code == 0, r.output
        r = run(app, ["quantize", "--model", str(src), "--precision", "auto", "--profile", str(tmp_path / "p.json"),
                      "--imatrix", str(tmp_path / "i.gguf"), "--out", str(tmp_path / "a.gguf"), "--json"])
        assert r.exit_code == 0, r.output
        art = json.loads(r.stdout)
        assert art["bits_per_weight"] <= 5.5
        assert {art["tensor_types"][f"blk.{i}.ffn_{p}_exps.weight"] for i in (0, 1) for p in ("gate", "up", "down")
                } <= {"Q4_K", "Q6_K"}
        prof = json.loads((tmp_path / "p.json").read_text())
        assert prof["measure"]["mode"] == "exact"
        assert all(t["candidates"]["Q4_K"]["measured_kld"] is not None for t in prof["tensors"]
                   if t["name"].endswith("_exps.weight"))


def test_quantize_auto_reports_the_profile_it_builds_on_stderr(tiny_model, tmp_path):
    """`quantize --precision auto` without --profile shows how far the profile got (imatrix blocks, then tensors),
    as `quantgate profile` does, on stderr: stdout stays the artifact's JSON."""
    from pathlib import Path

    from typer.testing import CliRunner

    from quantgate.cli import app

    calib = Path(__file__).resolve().parents[2] / "data/calibration.jsonl"
    r = CliRunner().invoke(app, ["quantize", "--model", str(tiny_model), "--precision", "auto", "--target-bpw", "6",
                                 "--calib", str(calib), "--cache-dir", str(tmp_path / "cache"),
                                 "--out", str(tmp_path / "a.gguf"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["recipe"]["precision"] == "AUTO"
    lines = r.stderr.splitlines()
    assert any(line.startswith("profile ") and "imatrix: chunks 1-" in line and "block 1/2 done" in line
               for line in lines), r.stderr[-2000:]
    assert any(line.startswith("profile ") and "blk.1.ffn_down.weight" in line for line in lines), r.stderr[-2000:]
