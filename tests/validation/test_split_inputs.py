"""evaluate / validate on split GGUFs: a split candidate (ours, given by any part) and a split baseline (written by
the `gguf` package's GGUFWriter, llama.cpp's own Python writer) score exactly as their unsplit files, on the torch
backend (every part read) and on the llama.cpp backend (llama-cpp-python opens the first part)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from quantgate.cli import app
from tests.validation._tiny import tiny_ggufs, tiny_model, write_samples  # noqa: F401  (fixtures)
from validation.evaluate import evaluate

runner = CliRunner()


def gguf_py_split(src: Path, out: Path, max_tensors: int) -> list[Path]:
    """Rewrite `src` as a split GGUF with gguf-py's GGUFWriter(split_max_tensors=...) (convert_hf_to_gguf.py's
    --split-max-tensors writer): its KV order and part layout, not ours."""
    from gguf import GGUFReader, GGUFValueType, GGUFWriter

    r = GGUFReader(src)
    w = GGUFWriter(out, str(r.get_field("general.architecture").contents()), split_max_tensors=max_tensors)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vt = f.types[0]
        sub = f.types[1] if vt == GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vt, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_shape=list(reversed([int(x) for x in t.shape])),
                     raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf"))


@pytest.fixture(scope="module")
def splits(tiny_model, tiny_ggufs, tmp_path_factory):  # noqa: F811
    from core.records import QuantizeRequest
    from quantgate.pipeline import quantize_model

    d = tmp_path_factory.mktemp("split")
    quantize_model(QuantizeRequest(source=tiny_model, out=d / "q8.gguf", precision="Q8_0", split_max_tensors=7))
    cand = sorted(d.glob("q8-*-of-*.gguf"))
    base = gguf_py_split(tiny_ggufs["F16"], d / "f16.gguf", 8)
    assert len(cand) >= 3 and len(base) >= 3
    return {"candidate": cand, "baseline": base, "dataset": write_samples(d / "eval.jsonl"), "cache": d / "cache"}


def _same(a, b) -> None:
    assert a.overall == b.overall and a.per_category == b.per_category
    assert [(e.name, e.mse) for e in a.per_tensor] == [(e.name, e.mse) for e in b.per_tensor]


def test_gguf_py_split_reads_back(splits, tiny_ggufs):  # noqa: F811
    """The gguf-py parts are a real split set: llama-cpp-python loads them from the first part."""
    import llama_cpp

    llm = llama_cpp.Llama(str(splits["baseline"][0]), n_ctx=64, verbose=False)
    try:
        assert llm.n_vocab() == 320
    finally:
        llm.close()


@pytest.mark.parametrize("backend", ["torch", "llama.cpp"])
def test_split_candidate_and_baseline_score_as_unsplit(splits, tiny_model, tiny_ggufs, backend):  # noqa: F811
    """A split float baseline (gguf-py's parts, given by the last part) and our split candidate (given by a middle
    part) against the unsplit F16 and Q8_0 files: every metric and per-tensor error equal."""
    from core.hashing import checkpoint_sha256

    kw = dict(max_tokens=32, batch_size=6, backend=backend, cache_dir=splits["cache"])
    whole = evaluate(tiny_ggufs["F16"], tiny_ggufs["Q8_0"], splits["dataset"], **kw)
    split = evaluate(splits["baseline"][-1], splits["candidate"][1], splits["dataset"], **kw)
    _same(whole, split)
    assert whole.overall.kl_mean > 0
    assert split.candidate.sha256 == checkpoint_sha256(splits["candidate"]) != whole.candidate.sha256
    assert split.baseline.sha256 == checkpoint_sha256(splits["baseline"])


def test_validate_split_candidate(splits, tiny_model, tmp_path):  # noqa: F811
    """`quantgate validate` gates a split candidate (any part): structural gates over every part, the set's SHA-256
    in the verdict, PASSED like the unsplit file."""
    from core.hashing import checkpoint_sha256

    res = runner.invoke(app, ["validate", "--baseline", str(tiny_model), "--quantized", str(splits["candidate"][2]),
                              "--dataset", str(splits["dataset"]), "--max-tokens", "32", "--no-expectations",
                              "--threshold", "0.05", "--metric", "kl_mean", "--report-dir", str(tmp_path / "r")])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines()[-1].startswith("PASSED: ")
    found = [json.loads(p.read_text()) for p in (tmp_path / "r").rglob("*.json")]
    text = json.dumps(found)
    assert checkpoint_sha256(splits["candidate"]) in text
    assert '"structural:verify"' in text and '"structural:finite"' in text
