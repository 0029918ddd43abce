"""Compliance report: lineage, gates, inline plots, alias history, environment, chain verification; in HTML (opened
in headless Chromium), Markdown and JSON; stored beside the version in MLflow."""
from __future__ import annotations

import json
import re

import pytest

from registry.client import PromotionRefused, mlflow_client
from registry.compliance import NOT_VALIDATED, build_report, render, write_report
from registry.registration import promote



def test_report_json_has_lineage_gates_aliases_and_chain(store):
    promote(store.model, store.passing.version, "validated", settings=store.settings)
    rep = build_report(store.model, store.passing.version, settings=store.settings)
    steps = {s["step"]: s for s in rep["lineage"]}
    assert steps["source checkpoint"]["sha256"] == store.art_pass.source_sha256
    assert steps["calibration set"]["sha256"] == "c" * 64
    assert steps["quantized file"]["sha256"] == store.art_pass.sha256
    assert "passed" in steps["validation"]["detail"] and "v1" in steps["registration"]["detail"]
    assert rep["verdict"] == "passed" and rep["gate_set"] == "default-v1"
    assert {(g["name"], g["threshold"], g["value"]) for g in rep["gates"]} >= {("kl_mean<=0.05", 0.05, 0.012)}
    assert any(a["action"] == "promote" and a["alias"] == "validated" and a["who"] for a in rep["alias_history"])
    assert rep["audit_chain"]["ok"] and rep["environment"]["registered_with"]["mlflow"]
    assert len(rep["validation"]["per_tensor"]) == len(store.art_pass.tensor_types)


def test_failed_version_report_shows_failure_and_refusals(store):
    with pytest.raises(PromotionRefused):
        promote(store.model, store.failing.version, "production", settings=store.settings)
    md = render(build_report(store.model, store.failing.version, settings=store.settings), "md")
    assert "**Verdict: FAILED** (rejected)" in md
    assert "| refuse |" in md and "| FAIL |" in md
    assert md.count(NOT_VALIDATED) == 2  # no validation JSON: both plots say so


def test_html_report_renders_in_chromium_with_verdict_and_plots(store, tmp_path):
    path = write_report(store.model, store.passing.version, tmp_path, "html", settings=store.settings)
    html = path.read_text()
    assert len(re.findall(r'<img alt="[^"]+" src="data:image/png;base64,', html)) == 2
    assert "http://" not in html and "https://" not in html  # self-contained
    c = mlflow_client(store.settings)
    run_id = c.get_model_version(store.model, store.passing.version).run_id
    assert f"compliance/{path.name}" in {a.path for a in c.list_artifacts(run_id, "compliance")}
    for fmt in ("md", "json"):
        p = write_report(store.model, store.passing.version, tmp_path, fmt, settings=store.settings, attach=False)
        assert p.stat().st_size > 1000
    assert json.loads((tmp_path / path.name.replace(".html", ".json")).read_text())["verdict"] == "passed"
    from tests._chromium import render

    page = render(path, "compliance-passed", tmp_path)
    page.assert_fits_and_offline()
    assert re.search(r'id="verdict"[^>]*>PASSED<', page.dom)
    assert len(re.findall(r'<img[^>]+src="data:image/png;base64,', page.dom)) == 2
    assert "audit chain intact" in page.dom
    assert page.screenshot.stat().st_size > 50_000
    # the failed version: its report fits the page too (hashes wrap, the full value stays in the text)
    failed = write_report(store.model, store.failing.version, tmp_path, "html", settings=store.settings,
                          attach=False)
    page = render(failed, "compliance-failed", tmp_path)
    page.assert_fits_and_offline()
    assert store.art_fail.sha256 in page.dom
