"""Issue 12 section 2: untrusted text (tensor names, general.name, file names, dataset categories) never becomes
HTML, Markdown or Rich markup, and never reaches a terminal as control characters.

Real files throughout: a tiny Llama quantized by the pipeline, a GGUF rewritten by the project's writer with
hostile tensor names and general.name, a dataset with hostile categories, and the CLI run as a subprocess.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace

import pytest

from core.text import md_code, md_escape, one_line
from tests.security._hostile import ALL_IN_ONE, HOSTILE, hostile_copy
from tests.validation._tiny import make_tiny_model, quantize_to, write_samples

ROOT = Path(__file__).resolve().parents[2]
#: A file name holding every attack a file name can hold (no '/').
EVIL_FILE = "q<script>alert(1) \"><img src=x onerror=alert(1)> `x`` [b]bold[link=https:evil.example]l \x1b[31mred\nz.gguf"


def cli(*args: str, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    e = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "400", "NO_COLOR": "1", **(env or {})}
    e.pop("QUANTGATE_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], cwd=cwd, env=e, capture_output=True,
                          text=True, timeout=timeout)


def assert_literal_terminal(out: str, *texts: str) -> None:
    """`out` shows each text literally (as one_line shows it) and holds no raw control character."""
    assert "MarkupError" not in out and "Traceback" not in out, out[-3000:]
    assert not re.search(r"[\x00-\x08\x0b-\x1f\x7f]", out), repr(out[:2000])
    for t in texts:
        assert one_line(t) in out, (one_line(t), out[-3000:])


def md_to_html(md: str) -> str:
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").render(md)


class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)


def parse_html(html: str) -> _Tags:
    p = _Tags()
    p.feed(html)
    return p


def assert_inert_html(html: str, *texts: str) -> None:
    """No script, no event handler, no link, no image but our own data: URIs; each text shown literally."""
    p = parse_html(html)
    for tag, attrs in p.tags:
        assert tag not in ("script", "iframe", "a", "object", "embed"), (tag, attrs)
        assert not any(k.startswith("on") for k in attrs), (tag, attrs)
        if tag == "img":
            assert attrs.get("src", "").startswith("data:image/png;base64,"), attrs
    text = "".join(p.text)
    for t in texts:
        assert one_line(t) in text, (one_line(t), text[-2000:])


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("inj")
    model = make_tiny_model(d / "model")
    q8 = quantize_to(model, d / "q8.gguf", "Q8_0")
    hostile = hostile_copy(q8, d / "hostile.gguf")
    evil = d / EVIL_FILE
    shutil.copy(q8, evil)
    ds = write_samples(d / "eval.jsonl")
    rows = [json.loads(line) for line in ds.read_text().splitlines()]
    cats = (HOSTILE[0], HOSTILE[3], HOSTILE[4])
    for i, r in enumerate(rows):
        r["category"] = cats[i % 3]
    (d / "evil.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"dir": d, "model": model, "q8": q8, "hostile": hostile, "evil": evil, "ds": d / "evil.jsonl",
            "cats": cats}


# ------------------------------------------------------------------------------------------------ helpers


@pytest.mark.parametrize("s", HOSTILE + (ALL_IN_ONE, "``", "a\\`b", "trailing`"))
def test_md_helpers_render_literally(s):
    html = md_to_html(f"x {md_escape(s)} y {md_code(s)} z\n")
    p = parse_html(html)
    assert [t for t, _ in p.tags] == ["p", "code"], html
    text = "".join(p.text)
    assert text == f"x {one_line(s)} y {one_line(s)} z\n", (text, html)


# ------------------------------------------------------------------------------------------------ GGUF commands


def test_inspect_and_verify_print_hostile_names_literally(env):
    r = cli("inspect", str(env["hostile"]), cwd=env["dir"])
    assert r.returncode == 0, r.stderr[-2000:]
    assert_literal_terminal(r.stdout, *(f"blk.{i}.{h}" for i, h in enumerate(HOSTILE)))
    assert "evil <script>alert(1)</script>" in r.stdout and "[link=https://evil.example]x[/link]" in r.stdout

    # renamed tensors are not the llama architecture's (issue 12 section 7): INVALID, with the names listed literally
    r = cli("verify", str(env["hostile"]), cwd=env["dir"])
    assert r.returncode == 1 and "INVALID" in r.stdout, r.stdout + r.stderr
    assert_literal_terminal(r.stdout + r.stderr, *(f"blk.{i}.{h}" for i, h in enumerate(HOSTILE) if i < 2))

    # the repro: a missing file whose name is markup used to crash with MarkupError (exit 1)
    r = cli("verify", "x[/b].gguf", cwd=env["dir"])
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stderr.strip().splitlines() == ["error: file not found: x[/b].gguf"]

    r = cli("verify", str(env["evil"]), cwd=env["dir"])
    assert r.returncode == 0
    assert_literal_terminal(r.stdout, str(env["evil"]))


def test_quantize_and_convert_print_names_literally(env):
    out = env["dir"] / "o[/b][link=https:x]l\x1b[2J.gguf".replace("/", "")
    # FORCE_TERMINAL: the progress bar is drawn, with the hostile tensor names as its description
    r = cli("quantize", "-m", str(env["hostile"]), "-p", "Q8_0", "--allow-requantize", "-o", str(out),
            cwd=env["dir"], env={"FORCE_TERMINAL": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "MarkupError" not in r.stderr and "Traceback" not in r.stderr
    assert "\x1b[2J" not in r.stdout and "\x1b[31mred" not in r.stderr
    assert one_line(str(out)) in r.stdout and out.exists()

    out2 = env["dir"] / "c[b]x\x07.gguf"
    r = cli("convert", "-m", str(env["model"]), "-o", str(out2), cwd=env["dir"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_literal_terminal(r.stdout, str(out2))


# ------------------------------------------------------------------------------------------------ reports


@pytest.fixture(scope="module")
def validated(env) -> dict:
    """`quantgate validate` of a valid GGUF with a hostile file name on a dataset with hostile categories, with a
    RELATIVE --report-dir (as the README shows)."""
    r = cli("validate", "-b", str(env["model"]), "--quantized", str(env["evil"]), "--threshold", "10", "--metric",
            "kl_mean", "-d", str(env["ds"]), "--max-tokens", "16", "--report-dir", "reports", "--data-docs", cwd=env["dir"])
    folder = next((env["dir"] / "reports").iterdir())
    return {"run": r, "folder": folder}


def test_validate_terminal_and_relative_report_dir(env, validated):
    r = validated["run"]
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert_literal_terminal(r.stdout + r.stderr)
    assert r.stdout.strip().splitlines()[-1].startswith("PASSED")
    assert (validated["folder"] / "gx").is_dir()          # GX Data Docs written under the relative report dir


def test_validation_md_and_html_escape(env, validated):
    folder = validated["folder"]
    md = (folder / "validation.md").read_text()
    assert_inert_html(md_to_html(md), Path(env["evil"]).name, *env["cats"])
    assert_inert_html((folder / "validation.html").read_text(), Path(env["evil"]).name, *env["cats"])


def test_validation_reports_escape_hostile_tensor_names(env, validated):
    """Tensor names in the per-tensor tables: the real run's report, its tensors renamed as the hostile GGUF's."""
    import dataclasses

    from core.records import Verdict
    from validation.publish import eval_report_of, render_html, render_markdown

    folder = validated["folder"]
    d = json.loads((folder / "validation.json").read_text())
    rep = eval_report_of(d)
    names = [f"blk.{i}.{h}" for i, h in enumerate(HOSTILE)]
    rep.per_tensor = [dataclasses.replace(e, name=names[i % len(names)], rel_rmse=1.0 + i)
                      for i, e in enumerate(rep.per_tensor[:len(names)])]
    verdict = Verdict.from_dict(json.loads((folder / "verdict.json").read_text()))
    verdict.gate_set = ALL_IN_ONE
    v = SimpleNamespace(verdict=verdict, baseline=ALL_IN_ONE, baseline_sha256="0" * 64, eval_report=rep,
                        facts=SimpleNamespace(path=str(env["evil"]), nbytes=1))
    md = render_markdown(v)
    worst = names[-5:]                                            # the 5 with the largest rel RMSE
    assert_inert_html(md_to_html(md), *worst, ALL_IN_ONE)
    assert_inert_html(render_html(v), *names)


def test_diff_terminal_and_reports(env):
    r = cli("diff", str(env["q8"]), str(env["hostile"]), "--report-dir", "diffs", cwd=env["dir"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_literal_terminal(r.stdout + r.stderr)
    folder = next((env["dir"] / "diffs").iterdir())
    names = [f"blk.{i}.{h}" for i, h in enumerate(HOSTILE)]
    md = (folder / "diff.md").read_text()
    assert_inert_html(md_to_html(md), *names, "general.name")
    assert_inert_html((folder / "diff.html").read_text(), *names)


def test_evaluate_prints_categories_and_paths_literally(env):
    r = cli("evaluate", "-b", str(env["model"]), "-c", str(env["evil"]), "-d", str(env["ds"]), "--max-tokens",
            "16", "-q", cwd=env["dir"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = cli("evaluate", "-b", str(env["model"]), "-c", str(env["evil"]), "-d", str(env["ds"]), "--max-tokens",
            "16", cwd=env["dir"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert_literal_terminal(r.stdout, str(env["evil"]), *env["cats"])


def test_junit_xml_stays_well_formed_with_hostile_text():
    import xml.etree.ElementTree as ET

    from core.records import GateResult, Verdict
    from validation.junit import error_junit_xml, junit_xml

    gates = [GateResult(f"structural:{h}", "structural", None, None, None, None, passed=False, detail=ALL_IN_ONE)
             for h in HOSTILE]
    v = Verdict(passed=False, artifact_sha256="0" * 64, gate_set=ALL_IN_ONE, gates=gates)
    root = ET.fromstring(junit_xml(v))                  # raw ESC in XML 1.0 would not parse
    fails = root.findall(".//failure")
    assert [f.get("message") for f in fails] == [one_line(ALL_IN_ONE)] * len(HOSTILE)
    assert [c.get("name") for c in root.iter("testcase")] == [one_line(f"structural:{h}") for h in HOSTILE]
    assert ET.fromstring(error_junit_xml(ALL_IN_ONE)).find(".//error").text == one_line(ALL_IN_ONE)
