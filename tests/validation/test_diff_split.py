"""`quantgate diff` on split GGUFs: any part names the whole set, on either side; a split and an unsplit file of the
same quantization are the same model (same tensors, same metadata but the split layout keys, same metrics against
the baseline); a missing part is one `error:` line, exit 2."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from core.hashing import checkpoint_sha256
from quantgate.cli import app
from quantgate.jobs import quantize_step
from validation.diff import diff

REFERENCE = Path(__file__).resolve().parents[2] / "models" / "reference"
runner = CliRunner()


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    w = tmp_path_factory.mktemp("diff-split")
    whole = quantize_step(REFERENCE, "Q8_0", workdir=w, name="ref")
    split = quantize_step(REFERENCE, "Q8_0", workdir=w, name="ref", split={"split_max_tensors": 8})
    q4 = quantize_step(REFERENCE, "Q4_K_M", workdir=w, name="ref", split={"split_max_tensors": 10})
    return {"whole": Path(whole["path"]), "split": [Path(p["path"]) for p in split["parts"]],
            "q4": [Path(p["path"]) for p in q4["parts"]]}


def test_a_part_names_the_whole_set_on_either_side(files, tmp_path):
    parts = files["split"]
    assert len(parts) >= 3
    r = diff(files["whole"], parts[2])                      # the third part: the whole 5-part model
    assert r.b["path"] == str(parts[0]) and r.b["files"] == [str(p) for p in parts] and r.b["parts"] == len(parts)
    assert r.b["sha256"] == checkpoint_sha256(parts) and r.b["n_tensors"] == r.a["n_tensors"]
    assert r.b["tensor_bytes"] == r.a["tensor_bytes"]
    assert all(t["type_a"] == t["type_b"] and t["bytes_a"] == t["bytes_b"] for t in r.tensors)
    assert r.metadata == {"added": {}, "removed": {}, "changed": {}}   # split.* is layout, not the model
    assert f"{len(parts)}-part split" in r.summary and "0 of 39 tensors change type" in r.summary

    out = runner.invoke(app, ["diff", str(files["q4"][-1]), str(parts[1]), "--report-dir", str(tmp_path / "rep")])
    assert out.exit_code == 0, out.output
    folder = next((tmp_path / "rep").iterdir())
    rep = json.loads((folder / "diff.json").read_text())
    assert rep["a"]["files"] == [str(p) for p in files["q4"]] and rep["b"]["files"] == [str(p) for p in parts]
    assert rep["metadata"]["changed"]["general.file_type"] == [15, 7]
    assert not any(k.startswith("split.") for kind in rep["metadata"].values() for k in kind)
    assert sum(t["type_a"] != t["type_b"] for t in rep["tensors"]) > 0 and len(rep["tensors"]) == 39


def test_split_and_unsplit_score_the_same_against_the_baseline(files, tmp_path):
    r = diff(files["whole"], files["split"][-1], REFERENCE, max_tokens=16, cache_dir=tmp_path / "cache")
    assert r.metrics_source == "evaluation"
    assert r.metrics["a"] == r.metrics["b"]                 # the same model, read from 1 file or from 5 parts
    assert all(t["rel_rmse_a"] is not None and t["rel_rmse_a"] == t["rel_rmse_b"] for t in r.tensors)


def test_a_missing_part_is_one_error_line(files, tmp_path):
    copy = tmp_path / "set"
    copy.mkdir()
    for p in files["split"]:
        shutil.copy(p, copy / p.name)
    (copy / files["split"][1].name).unlink()
    for a, b in ((files["whole"], copy / files["split"][0].name), (copy / files["split"][3].name, files["whole"])):
        out = runner.invoke(app, ["diff", str(a), str(b), "--report-dir", str(tmp_path / "rep")])
        assert out.exit_code == 2, out.output
        assert out.output.count("error:") == 1 and "missing" in out.output and "Traceback" not in out.output
    assert not (tmp_path / "rep").exists()
