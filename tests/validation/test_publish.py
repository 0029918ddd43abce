"""Reports: validation.json schema and numbers, Markdown, and the HTML rendered by headless Chromium with its plots."""
from __future__ import annotations

import json
import re
from pathlib import Path


from tests.validation._gate_fixtures import MAX_TOKENS, gate_env, verdicts  # noqa: F401
from validation.publish import eval_report_of


def test_json_schema_and_round_trip(verdicts):  # noqa: F811
    v = verdicts["Q2_K"]
    d = json.loads(Path(v.report_paths["validation_json"]).read_text())
    assert (d["schema"], d["schema_version"]) == ("quantgate.validation", 1)
    assert d["artifact"]["sha256"] == v.artifact_sha256 and d["verdict"]["passed"] is False
    assert d["overall"]["kl_mean"] == v.metrics["kl_mean"]
    assert {"code", "chat", "math"} == set(d["per_category"]) and d["per_tensor"]
    assert eval_report_of(d).overall.kl_mean == v.metrics["kl_mean"]
    verdict = json.loads(Path(v.report_paths["verdict"]).read_text())
    from core.records import Verdict  # the registry reads verdict.json back

    assert Verdict.from_dict(verdict).passed is False


def test_markdown(verdicts):  # noqa: F811
    md = Path(verdicts["Q2_K"].report_paths["validation_md"]).read_text()
    # names are escaped as literal Markdown (core.text.md_cell): `_` and `<` carry a backslash
    assert md.startswith("## ❌ quantgate validation: FAILED") and "| **FAIL** | metric | kl\\_mean\\<=0.01 |" in md
    assert "Worst tensors" in md
    assert "✅" in Path(verdicts["Q8_0"].report_paths["validation_md"]).read_text()


def test_markdown_is_a_pr_comment_even_in_the_worst_case(verdicts):  # noqa: F811
    """Thousands of failing gates with long details, hundreds of long category names and tensor names, a long file
    name: validation.md stays far below GitHub's 65,536-character comment limit and still opens with the verdict,
    the failed gates and the quality table; the rest is counted and left to the HTML."""
    import dataclasses
    from types import SimpleNamespace

    from core.records import GateResult, Verdict
    from validation.publish import render_markdown

    v = verdicts["Q2_K"]
    folder = Path(v.report_paths["validation_json"]).parent
    rep = eval_report_of(json.loads((folder / "validation.json").read_text()))
    cats = {f"category-{i:04d}-" + "x" * 300: rep.overall for i in range(400)}
    rep = dataclasses.replace(rep, per_category=cats,
                              per_tensor=[dataclasses.replace(e, name="blk.0." + "t" * 5000 + str(i))
                                          for i, e in enumerate(rep.per_tensor)])
    gates = [GateResult(name=f"{c[:40]}:kl_p99<=0.001", kind="metric", metric="kl_p99", comparator="<=",
                        threshold=0.001, value=1.5, category=c, detail="d" * 5000) for c in cats]
    gates += [GateResult(name=f"expectation:suite:{i}" + "e" * 2000, kind="expectation", detail="z" * 5000)
              for i in range(3000)]
    verdict = Verdict.from_dict(json.loads((folder / "verdict.json").read_text()))
    verdict.gates = gates
    doc = SimpleNamespace(verdict=verdict, baseline="b" * 5000, baseline_sha256="0" * 64, eval_report=rep,
                          facts=SimpleNamespace(path="/x/" + "f" * 5000 + ".gguf", nbytes=1))
    md = render_markdown(doc)
    assert len(md) < 20_000, len(md)
    assert md.startswith("## ❌ quantgate validation: FAILED")
    head = md.split("### Quality gates")[0]
    assert "### Failed gates" in head and f"... and {len(gates) - 15} more in validation.html" in head
    assert "_394 more categories in validation.html_" in md and "Full report: `validation.html`" in md


def test_html_opens_with_verdict_quality_and_plots_and_folds_the_gates(verdicts):  # noqa: F811
    html = Path(verdicts["Q2_K"].report_paths["validation_html"]).read_text()
    order = [html.index(x) for x in ('id="verdict"', 'id="failed-gates"', 'id="quality"', 'id="quality-gates"',
                                     "<img", 'id="suites"', '<details id="all-gates"', '<details id="per-tensor"')]
    assert order == sorted(order)
    assert re.search(r'<summary>Every gate \(\d+ gates: \d+ passed, 1 failed, 0 skipped\)</summary>', html)


def test_html_in_headless_chromium(verdicts, gate_env, tmp_path):  # noqa: F811
    """Both verdicts' validation.html and a diff.html, as a reader sees them: the verdict and the three plots
    rendered, nothing fetched from the network, no horizontal scrollbar at 1280 px; screenshots in
    ci-artifacts/screenshots/."""
    from tests._chromium import render
    from validation.diff import diff, write_diff_reports

    pages = {}
    for name, v in (("validation-failed", verdicts["Q2_K"]), ("validation-passed", verdicts["Q8_0"])):
        html_path = Path(v.report_paths["validation_html"])
        assert not re.search(r"(src|href)=['\"]https?://", html_path.read_text())     # self-contained
        pages[name] = page = render(html_path, name, tmp_path)
        page.assert_fits_and_offline()
        imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]{200,})"', page.dom)
        assert {a for a, _ in imgs} == {"per-tensor error by layer", "per-category metrics",
                                        "KL divergence distribution"}
    assert re.search(r'id="verdict"[^>]*>FAILED: 1 of \d+ gates failed: kl_mean=', pages["validation-failed"].dom)
    r = diff(gate_env["ggufs"]["Q4_K_M"], gate_env["ggufs"]["Q5_K_M"], gate_env["model"], dataset=gate_env["dataset"],
             max_tokens=MAX_TOKENS, cache_dir=gate_env["cache"])
    page = render(write_diff_reports(r, tmp_path / "diff") / "diff.html", "diff", tmp_path)
    page.assert_fits_and_offline()
    assert 'src="data:image/png;base64,' in page.dom
