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


def test_auto_on_a_moe_model_is_refused_with_one_clear_error(tmp_path, calib_jsonl, cache_dir):
    """Mixtral's stacked 3-D experts have no 2-D parameter the measurements can perturb: refused before any pass."""
    from core.errors import QuantGateError

    from analyzer.profile import build_profile
    from tests.quantgate.tiny_hf import make_tiny_model

    mix = make_tiny_model(tmp_path / "mix", "mixtral", seed=1)
    with pytest.raises(QuantGateError, match=r"does not measure MoE expert tensors yet \(blk\.0\.ffn_"):
        build_profile(mix, calib_jsonl)


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
