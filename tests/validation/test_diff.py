"""diff(): Q4_K_M vs Q5_K_M with the baseline; its numbers equal the two validation reports'; regression exit."""
from __future__ import annotations

import json
from pathlib import Path

from tests.validation._gate_fixtures import MAX_TOKENS, gate_env, run_validate  # noqa: F401
from validation.diff import diff, write_diff_reports
from validation.thresholds import gates_from_config


def test_q4_vs_q5_matches_validation_reports(gate_env, tmp_path):  # noqa: F811
    va, vb = (run_validate(gate_env, p, threshold=10.0) for p in ("Q4_K_M", "Q5_K_M"))
    ja, jb = (json.loads(Path(v.report_paths["validation_json"]).read_text()) for v in (va, vb))
    gates = gates_from_config(["kl_mean <= 0.05", "top1_agreement >= 0.9"])
    r = diff(gate_env["ggufs"]["Q4_K_M"], gate_env["ggufs"]["Q5_K_M"], gate_env["model"], dataset=gate_env["dataset"],
             max_tokens=MAX_TOKENS, cache_dir=gate_env["cache"], gates=gates, tolerance=0.0)
    assert r.metrics_source == "evaluation" and r.baseline["baseline_cache_hit_b"]
    assert r.metrics["a"] == ja["overall"] and r.metrics["b"] == jb["overall"]
    assert r.metrics["delta"]["kl_mean"] == jb["overall"]["kl_mean"] - ja["overall"]["kl_mean"] < 0   # Q5 better
    err_a = {t["name"]: t["rel_rmse"] for t in ja["per_tensor"]}
    assert all(t["rel_rmse_a"] == err_a[t["name"]] for t in r.tensors)
    assert any(t["type_a"] == "Q4_K" and t["type_b"] == "Q5_K" for t in r.tensors)
    assert r.metadata["changed"]["general.file_type"] == [15, 17] and not r.metadata["added"]
    assert r.a["sha256"] == va.artifact_sha256 and r.b["sha256"] == vb.artifact_sha256
    assert [g["name"] for g in r.gates] == ["kl_mean<=0.05", "top1_agreement>=0.9"]
    assert not r.regressions and "regressions beyond 0: none" in r.summary
    # reversed, Q4_K_M is a regression on kl_mean beyond 0
    back = diff(gate_env["ggufs"]["Q5_K_M"], gate_env["ggufs"]["Q4_K_M"], tolerance=0.0)
    assert back.metrics_source == "validation reports"              # read from the validation.json files
    assert back.metrics["a"] == jb["overall"] and any(x.startswith("kl_mean ") for x in back.regressions)
    folder = write_diff_reports(back, tmp_path / "d")
    assert sorted(p.name for p in folder.iterdir()) == ["diff.html", "diff.json", "diff.md"]
    assert folder.name == f"diff-{vb.artifact_sha256[:12]}-{va.artifact_sha256[:12]}"
    assert "data:image/png;base64," in (folder / "diff.html").read_text()
    assert json.loads((folder / "diff.json").read_text())["regressions"] == back.regressions


def test_metadata_only_diff(gate_env, tmp_path):  # noqa: F811
    import shutil

    q8 = tmp_path / "q8.gguf"
    shutil.copy(gate_env["ggufs"]["Q8_0"], q8)       # no reports beside this copy
    r = diff(q8, gate_env["ggufs"]["Q2_K"])
    assert r.metrics is None and "no model metrics" in r.summary
    assert r.metadata["changed"]["quantgate.precision"] == ["Q8_0", "Q2_K"]
    assert sum(t["type_a"] != t["type_b"] for t in r.tensors) > 0 and r.b["nbytes"] < r.a["nbytes"]
