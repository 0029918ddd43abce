"""GX suites: bundled suites load and are versioned; the tensor and dataset suites catch what they promise; user
suites are picked up; GX stays out of commands that do not need it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runtime.datasets import Dataset, Sample
from validation.expectations import (
    SuiteError,
    dataset_table,
    find_suites,
    load_suite,
    run_suites,
    tensor_table,
)
from validation.tensor_error import TensorError

PARAMS = {"allowed_categories": ["chat", "code", "math"], "min_chars": 1, "max_chars": 8000}


def _ds(rows):
    samples = [Sample(i, c, t, "test") for i, c, t in rows]
    return Dataset(samples, "0" * 64)


def _failed(results):
    return {r.name.split(":", 2)[2] for r in results if not r.passed}


def test_bundled_suites_are_versioned():
    suites = {s.name: s for s in find_suites()}
    assert set(suites) == {"quantgate.tensors", "quantgate.dataset"}
    assert all(s.version == 1 for s in suites.values())
    assert suites["quantgate.tensors"].table == "tensors" and suites["quantgate.dataset"].table == "dataset"


def test_tensor_and_dataset_suites(tmp_path):
    per_tensor = [
        TensorError("blk.0.attn_q.weight", "Q8_0", [256, 256], 65536, 8.5, 1e-7, 0.004, 0.99999, 0.01),
        TensorError("blk.0.attn_k.weight", "Q4_K", [256, 256], 65536, 4.5, 1e-3, 0.3, 0.95, 0.1),   # too much error
        TensorError("blk.0.attn_v.weight", "Q6_K", [256, 256], 65536, 7.0, 1e-5, 0.01, 0.9999, 0.01),  # bad bpw
        TensorError("output_norm.weight", "F32", [256], 256, 32.0, 0.0, 0.0, None, 0.0),             # null cosine
    ]
    names = [t.name for t in per_tensor[:3]] + ["output.weight"]   # the model has a tensor the table lacks
    ev = _ds([("e1", "code", "def f(): pass"), ("e2", "chat", "User: hi"), ("e3", "poetry", "roses"),
              ("e4", "math", "1 + 1 = 2"), ("e5", "math", "User:   hi"), ("e6", "math", "3 * 3 = 9")])
    cal = _ds([("c1", "code", "def f():  pass"), ("c2", "math", "2 + 2 = 4")])
    user = tmp_path / "suites"
    user.mkdir()
    (user / "mine.json").write_text(json.dumps({
        "name": "team.tensors", "meta": {"quantgate": {"suite_version": 3, "table": "tensors"}},
        "expectations": [{"type": "expect_column_max_to_be_between", "kwargs": {"column": "mse", "max_value": 1e-4},
                          "meta": {"id": "mse_small"}}]}))
    suites = find_suites([user])
    res = run_suites({"tensors": tensor_table(per_tensor), "dataset": dataset_table(ev, cal)}, suites,
                     {**PARAMS, "n_model_tensors": 4, "model_tensor_names": names}, docs_dir=tmp_path / "docs")
    assert all(r.kind == "expectation" for r in res)
    tens = [r for r in res if r.category == "tensors"]
    assert _failed(tens) == {"rel_rmse_q4_k_q4_0_q4_1_le_0.12", "cosine_q4_k_q4_0_q4_1_ge_0.99",
                             "bpw_consistent_with_type", "cosine_not_null", "every_model_tensor_present", "mse_small"}
    by = {r.name: r for r in res}
    assert "blk.0.attn_k.weight" in by["expectation:quantgate.tensors:rel_rmse_q4_k_q4_0_q4_1_le_0.12"].detail
    assert "output.weight" in by["expectation:quantgate.tensors:every_model_tensor_present"].detail
    data = [r for r in res if r.category == "dataset"]
    assert _failed(data) == {"allowed_categories", "no_duplicate_texts", "no_calibration_eval_overlap",
                             "eval_categories_balanced"}
    assert "e3" in by["expectation:quantgate.dataset:allowed_categories"].detail
    assert (tmp_path / "docs" / "index.html").exists()


def test_bad_suite_files(tmp_path):
    (tmp_path / "a.json").write_text('{"name": "x", "expectations": [], "meta": {"quantgate": {"table": "rows"}}}')
    with pytest.raises(SuiteError, match="table"):
        load_suite(tmp_path / "a.json")
    with pytest.raises(SuiteError, match="not found"):
        find_suites([tmp_path / "nope"])


def test_gx_not_imported_by_other_commands(tmp_path):
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom quantgate.cli import app\n"
            "r = CliRunner().invoke(app, ['version'])\nassert r.exit_code == 0, r.output\n"
            "bad = [m for m in ('great_expectations', 'pandas', 'matplotlib', 'validation.expectations') "
            "if m in sys.modules]\nprint(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
