"""The layer-streamed measurement against the exact one (a whole-model pass per tensor and type) on the bundled
model: the budget policy picks the same types for most tensors, and the streamed predictions rank the exact KLDs.
Also: an HF folder and its F16 GGUF share cache rows (keys use the weights fingerprint)."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
REF = ROOT / "models/reference"
CALIB = ROOT / "data/calibration.jsonl"
#: small settings so both modes fit CI: 4 imatrix chunks, 4 x 64 measurement tokens, four candidate types
KW = dict(n_chunks=4, measure_seqs=4, measure_len=64, candidate_types=("Q3_K", "Q4_K", "Q6_K", "Q8_0"))
#: measured on this model with KW (docs/ANALYZER.md, "Streamed vs exact"): 7 of 30 tensors differ at Q4_K_M's size,
#: all one step apart and all but one attn_q/attn_k (their gain is the attention group's, calibrated mostly by v/o)
MAX_DIFFERENT = 8


@pytest.fixture(scope="module")
def profiles(tmp_path_factory):
    from analyzer.cache import CalibrationCache
    from analyzer.profile import build_profile

    cache_dir = tmp_path_factory.mktemp("stream-cache")
    with CalibrationCache(cache_dir) as cache:
        out = {m: build_profile(REF, CALIB, measure_mode=m, cache=cache, **KW) for m in ("stream", "exact")}
    out["cache_dir"] = cache_dir
    return out


def _choices(prof, target_bpw: float) -> dict[str, str]:
    from analyzer.auto import make_policy
    from analyzer.profile import apply_policy

    p = copy.deepcopy(prof)
    apply_policy(p, make_policy(p, REF, mode="budget", target_bpw=target_bpw))
    return {t.name: t.chosen for t in p.tensors if t.quantizable}


def test_streamed_choices_agree_with_the_exact_measurement(profiles):
    from analyzer.auto import mix_sizes

    stream, exact = profiles["stream"], profiles["exact"]
    assert stream.measure["mode"] == "stream" and exact.measure["mode"] == "exact"
    q = [t for t in stream.tensors if t.quantizable]
    assert len(q) == 30
    assert all(s.block_err is not None for t in q if t.name != "output.weight" for s in t.candidates.values())
    bpw = 8 * mix_sizes(REF)["Q4_K_M"] / stream.model["n_params"]
    a, b = _choices(stream, bpw), _choices(exact, bpw)
    differ = sorted((n, a[n], b[n]) for n in a if a[n] != b[n])
    print("stream vs exact choices at Q4_K_M's bytes:", len(differ), "of", len(a), differ)
    assert len(differ) <= MAX_DIFFERENT, differ


def test_streamed_predictions_rank_the_exact_klds(profiles):
    from scipy.stats import spearmanr

    stream, exact = profiles["stream"], profiles["exact"]
    pred, kld = [], []
    for ts, te in zip(stream.tensors, exact.tensors):
        for qt, s in ts.candidates.items():
            pred.append(s.predicted)
            kld.append(te.candidates[qt].measured_kld)
    assert len(pred) == 30 * 4
    rho = spearmanr(pred, kld).statistic
    print("Spearman(streamed prediction, exact KLD):", rho)
    assert rho > 0.9
    # the head is measured exactly in both modes (only the head changes): the same KLD up to float rounding
    hs = next(t for t in stream.tensors if t.name == "output.weight").candidates["Q4_K"].measured_kld
    he = next(t for t in exact.tensors if t.name == "output.weight").candidates["Q4_K"].measured_kld
    assert hs == pytest.approx(he, rel=1e-3)


def test_hf_folder_and_its_gguf_share_cache_rows(tmp_path):
    """Same weights, same token ids -> the same rows. (No imatrix here: transformers and llama.cpp tokenize the
    512-token imatrix chunks of data/calibration.jsonl differently at one position, so the imatrix, and every row
    keyed on its digest, rightly differ; the 64-token measurement chunks agree.)"""
    from analyzer.cache import CalibrationCache
    from analyzer.profile import build_profile
    from quantgate.convert import convert_model

    gguf = tmp_path / "ref-f16.gguf"
    convert_model(REF, gguf, "f16")
    kw = {**KW, "use_imatrix": False, "candidate_types": ("Q4_K", "Q8_0")}
    with CalibrationCache(tmp_path / "cache") as cache:
        hf = build_profile(REF, CALIB, cache=cache, **kw)
        again = build_profile(gguf, CALIB, cache=cache, **kw)
    assert hf.timings["computed_tensors"] == 30
    assert again.model["sha256"] == hf.model["sha256"]
    assert again.timings["computed_tensors"] == 0
    assert [t.candidates for t in again.tensors] == [t.candidates for t in hf.tensors]


def test_token_embd_rows_measure_the_selected_rows_of_the_whole_delta(tmp_path):
    """token_embd's block error and calibration stream are computed from the rows the tokens select (no second
    vocabulary-sized temporary: 2.1 GB at Llama-3-8B's shapes) and equal the whole-matrix delta's rows exactly."""
    import numpy as np
    import torch

    from analyzer.profile import _hf_to_gguf, _quant_dequant
    from analyzer.stream_measure import _rel, streamed_sweep
    from runtime.layer_stream import LayerStream
    from runtime.tokenize import calibration_chunks
    from runtime.datasets import load_dataset

    chunks = calibration_chunks(REF, [s.text for s in load_dataset(CALIB).usable()], 32, 2).chunks
    types = ["Q4_K", "Q8_0"]
    res = streamed_sweep(REF, chunks, {"token_embd.weight": types}, imatrix=None, quant_dequant=_quant_dequant,
                         gguf_names=lambda names, n: _hf_to_gguf(names, "llama", n), allowed=lambda n, t: True)
    with LayerStream(REF) as ls:
        e = ls.tensor(ls.arch.embed)
    ids = torch.tensor(chunks, dtype=torch.long)
    h = torch.nn.functional.embedding(ids, e)
    for qt in types:
        whole = torch.from_numpy(_quant_dequant(e.numpy(), qt, None)) - e  # the delta of the whole matrix
        assert res.rows["token_embd.weight"][qt].block_err == _rel(torch, torch.nn.functional.embedding(ids, whole), h)
    cal = torch.from_numpy(_quant_dequant(e.numpy(), "Q3_K", None)) - e
    d = torch.nn.functional.embedding(ids, cal)
    assert res.gain_detail["token_embd.weight"]["block_err"] == _rel(torch, d, h) > 0
    assert np.isfinite(res.gains["token_embd.weight"])
