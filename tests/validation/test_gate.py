"""gate_and_report(): Q8_0 passes and Q2_K fails a tight KL gate; unusable inputs leave only error.json; another model's
file is rejected by the derived-from gate before any evaluation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.validation._gate_fixtures import (  # noqa: F401
    gate_env,
    other_model_gguf,
    run_validate,
    verdicts,
)
from validation.gate import EXIT_FAILED, EXIT_PASSED, UnusableInput, exit_code


def test_pass_and_fail(verdicts):  # noqa: F811
    ok, bad = verdicts["Q8_0"], verdicts["Q2_K"]
    assert ok.passed and exit_code(ok) == EXIT_PASSED
    assert not bad.passed and exit_code(bad) == EXIT_FAILED
    failed = [g for g in bad.gates if not g.passed]
    assert [g.name for g in failed] == ["kl_mean<=0.01"] and failed[0].value > 0.01
    kinds = {g.kind for g in ok.gates}
    assert kinds == {"structural", "expectation", "metric"}
    assert ok.metrics["kl_mean"] < 0.01 < bad.metrics["kl_mean"]
    folder = Path(ok.report_paths["validation_json"]).parent
    assert folder.name == ok.artifact_sha256 and folder.parent.name == "tiny-Q8_0.gguf.reports"
    assert sorted(p.name for p in folder.iterdir()) == ["junit.xml", "validation.html", "validation.json",
                                                        "validation.md", "verdict.json"]   # gx/ only on request
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]   # no staging left behind


@pytest.mark.parametrize("damage", ["corrupt", "truncated", "missing"])
def test_unusable_candidate_leaves_only_error_record(gate_env, tmp_path, damage):  # noqa: F811
    src = gate_env["ggufs"]["Q8_0"].read_bytes()
    bad = tmp_path / "bad.gguf"
    if damage == "corrupt":
        bad.write_bytes(b"XXXX" + src[4:])
    elif damage == "truncated":
        bad.write_bytes(src[: len(src) * 2 // 3])
    with pytest.raises(UnusableInput) as e:
        run_validate(gate_env, "Q8_0", gguf=bad, report_dir=tmp_path / "reports", junit=tmp_path / "junit.xml")
    [folder] = (tmp_path / "reports").iterdir()
    assert [p.name for p in folder.iterdir()] == ["error.json"]
    rec = json.loads((folder / "error.json").read_text())
    assert rec["exit_code"] == 2 and rec["error"] == str(e.value) and "bad.gguf" in rec["error"]
    assert (folder.name == "missing") == (damage == "missing")
    assert "<error" in (tmp_path / "junit.xml").read_text()


def test_stale_reports_replaced_by_error_record(gate_env, tmp_path):  # noqa: F811
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 16)   # header claims absurd counts
    root = tmp_path / "r"
    from validation.publish import artifact_key

    stale = root / artifact_key(bad)
    stale.mkdir(parents=True)
    (stale / "validation.json").write_text("{}")
    with pytest.raises(UnusableInput):
        run_validate(gate_env, "Q8_0", gguf=bad, report_dir=root)
    assert [p.name for p in stale.iterdir()] == ["error.json"]


def test_other_model_rejected_by_derived_from(gate_env, other_model_gguf, tmp_path):  # noqa: F811
    v = run_validate(gate_env, "Q8_0", gguf=other_model_gguf, report_dir=tmp_path / "r")
    assert not v.passed and exit_code(v) == EXIT_FAILED
    g = {x.name: x for x in v.gates}
    assert not g["structural:derived_from"].passed
    assert g["kl_mean<=0.01"].skipped and not g["kl_mean<=0.01"].passed
    assert "overall" not in json.loads(Path(v.report_paths["validation_json"]).read_text())   # no evaluation ran
