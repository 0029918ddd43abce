"""JUnit XML: one testcase per gate, failures and skips counted, parsed back with xml.etree."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from core.records import GateResult, Verdict
from tests.validation._gate_fixtures import gate_env, verdicts  # noqa: F401
from validation.junit import junit_xml


def test_round_trip_counts():
    v = Verdict("ab" * 32, False, [
        GateResult("structural:verify", "structural", passed=True, detail="no problems"),
        GateResult("kl_mean<=0.01", "metric", "kl_mean", "<=", 0.01, 0.5, passed=False, detail="kl_mean = 0.5 <&>"),
        GateResult("top1_agreement>=0.9", "metric", skipped=True, detail="skipped: x")], "g@1")
    root = ET.fromstring(junit_xml(v))
    suite = root.find("testsuite")
    assert (suite.get("tests"), suite.get("failures"), suite.get("skipped")) == ("3", "1", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == ["structural:verify", "kl_mean<=0.01", "top1_agreement>=0.9"]
    assert cases[1].find("failure").get("message") == "kl_mean = 0.5 <&>"
    props = {p.get("name"): p.get("value") for p in cases[1].find("properties")}
    assert props == {"metric": "kl_mean", "comparator": "<=", "threshold": "0.01", "value": "0.5"}
    assert cases[2].find("skipped") is not None and cases[0].find("failure") is None


def test_report_junit_matches_verdict(verdicts):  # noqa: F811
    for v in verdicts.values():
        root = ET.parse(Path(v.report_paths["junit"])).getroot()
        cases = root.iter("testcase")
        failed = {c.get("name") for c in cases if c.find("failure") is not None}
        assert failed == {g.name for g in v.gates if not g.passed and not g.skipped}
        assert int(root.get("tests")) == len(v.gates)
