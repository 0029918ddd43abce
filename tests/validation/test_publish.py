"""Reports: validation.json schema and numbers, Markdown, and the HTML rendered by headless Chromium with its plots."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.validation._gate_fixtures import gate_env, verdicts  # noqa: F401
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


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium not installed (apt-get install chromium)")
def test_html_in_headless_chromium(verdicts, tmp_path):  # noqa: F811
    html_path = Path(verdicts["Q2_K"].report_paths["validation_html"])
    text = html_path.read_text()
    assert not re.search(r"(src|href)=['\"]https?://", text)            # self-contained
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run(["chromium", *flags, "--dump-dom", html_path.as_uri()], capture_output=True, text=True,
                         timeout=90).stdout
    imgs = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([A-Za-z0-9+/=]{200,})"', dom)
    assert {a for a, _ in imgs} == {"per-tensor error by layer", "per-category metrics", "KL divergence distribution"}
    assert re.search(r'id="verdict"[^>]*>FAILED: 1 of \d+ gates failed: kl_mean=', dom)
    shot = tmp_path / "shot.png"
    subprocess.run(["chromium", *flags, f"--screenshot={shot}", "--window-size=1200,900", html_path.as_uri()],
                   capture_output=True, timeout=90)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000
