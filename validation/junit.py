"""JUnit XML of a Verdict: one testcase per gate, so CI systems show each gate as a test (failed / skipped / passed)."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from core.atomic import atomic_write_text
from core.records import GateResult, Verdict
from core.text import one_line


def _x(v: object) -> str:
    """Text for XML: one line with control characters shown as \\xNN (XML 1.0 cannot hold most of them at all)."""
    return one_line(v, 100_000)


def _case(suite: ET.Element, g: GateResult) -> None:
    case = ET.SubElement(suite, "testcase", classname=_x(f"quantgate.{g.kind}"), name=_x(g.name), time="0")
    props = ET.SubElement(case, "properties")
    for key in ("metric", "comparator", "threshold", "value", "category"):
        v = getattr(g, key)
        if v is not None:
            ET.SubElement(props, "property", name=key, value=_x(v))
    if g.skipped:
        ET.SubElement(case, "skipped", message=_x(g.detail))
    elif not g.passed:
        el = ET.SubElement(case, "failure", message=_x(g.detail or f"{g.name} failed"), type=_x(g.kind))
        el.text = _x(g.detail)
    elif g.detail:
        ET.SubElement(case, "system-out").text = _x(g.detail)


def junit_xml(verdict: Verdict, suite_name: str = "quantgate.validate") -> str:
    """The verdict as a JUnit XML document (one <testsuite>, one <testcase> per gate)."""
    failures = sum(1 for g in verdict.gates if not g.passed and not g.skipped)
    skipped = sum(1 for g in verdict.gates if g.skipped)
    root = ET.Element("testsuites", name=suite_name, tests=str(len(verdict.gates)), failures=str(failures),
                      errors="0", skipped=str(skipped))
    suite = ET.SubElement(root, "testsuite", name=f"{suite_name}[{verdict.artifact_sha256[:12]}]",
                          tests=str(len(verdict.gates)), failures=str(failures), errors="0", skipped=str(skipped),
                          timestamp=verdict.created_at or "")
    props = ET.SubElement(suite, "properties")
    for k, v in (("artifact_sha256", verdict.artifact_sha256), ("gate_set", verdict.gate_set),
                 ("verdict", "passed" if verdict.passed else "failed")):
        ET.SubElement(props, "property", name=k, value=_x(v))
    for g in verdict.gates:
        _case(suite, g)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def error_junit_xml(message: str, suite_name: str = "quantgate.validate") -> str:
    """A JUnit document with one errored testcase: the inputs could not be validated (exit 2)."""
    root = ET.Element("testsuites", name=suite_name, tests="1", failures="0", errors="1", skipped="0")
    suite = ET.SubElement(root, "testsuite", name=suite_name, tests="1", failures="0", errors="1", skipped="0")
    case = ET.SubElement(suite, "testcase", classname="quantgate.input", name="inputs usable", time="0")
    ET.SubElement(case, "error", message=_x(message), type="UnusableInput").text = _x(message)
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def write_junit(verdict: Verdict, path: "str | os.PathLike[str]") -> None:
    """Atomically write junit_xml(verdict) to `path`."""

    atomic_write_text(path, junit_xml(verdict))


__all__ = ["junit_xml", "error_junit_xml", "write_junit"]
