"""`quantgate validate` / `quantgate diff` end to end: exit codes 0/1/2, last line, JUnit file, report folder."""
from __future__ import annotations

import xml.etree.ElementTree as ET

from typer.testing import CliRunner

from quantgate.cli import app
from tests.validation._gate_fixtures import MAX_TOKENS, gate_env  # noqa: F401


def _run(args):
    return CliRunner().invoke(app, args)


def _base(env, precision, tmp_path):
    return ["validate", "--baseline", str(env["model"]), "--quantized", str(env["ggufs"][precision]),
            "--dataset", str(env["dataset"]), "--max-tokens", str(MAX_TOKENS), "--report-dir", str(tmp_path / "r")]


def test_cli_pass_fail_and_unusable(gate_env, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(gate_env["cache"]))
    ok = _run(_base(gate_env, "Q8_0", tmp_path) + ["--threshold", "0.01", "--metric", "kl_mean",
                                                   "--junit", str(tmp_path / "j.xml")])
    assert ok.exit_code == 0, ok.output
    assert ok.output.strip().splitlines()[-1].startswith("PASSED: ") and "kl_mean=" in ok.output.splitlines()[-1]
    assert ET.parse(tmp_path / "j.xml").getroot().get("failures") == "0"
    (tmp_path / "g.yaml").write_text("gates: ['kl_mean <= 0.01', '*:top1_agreement >= 0.5']\n")
    bad = _run(_base(gate_env, "Q2_K", tmp_path) + ["--gates", str(tmp_path / "g.yaml"), "--no-expectations"])
    assert bad.exit_code == 1, bad.output
    last = bad.output.strip().splitlines()[-1]
    assert last.startswith("FAILED: ") and "kl_mean=" in last and "breaks <= 0.01" in last
    trunc = tmp_path / "t.gguf"
    trunc.write_bytes(gate_env["ggufs"]["Q8_0"].read_bytes()[:5000])
    args = _base(gate_env, "Q8_0", tmp_path) + ["--threshold", "0.01"]
    args[args.index("--quantized") + 1] = str(trunc)
    err = _run(args)
    assert err.exit_code == 2 and "truncated" in err.output and "error.json" in err.output
    assert _run(_base(gate_env, "Q8_0", tmp_path)).exit_code == 2        # neither --threshold nor --gates


def test_cli_diff_regression_exit(gate_env, tmp_path):  # noqa: F811
    args = ["diff", str(gate_env["ggufs"]["Q8_0"]), str(gate_env["ggufs"]["Q2_K"]), "--report-dir", str(tmp_path)]
    r = _run(args)
    assert r.exit_code == 0, r.output
    assert r.output.strip().splitlines()[-1].startswith("DIFF: ")
    reg = _run(args + ["--baseline", str(gate_env["model"]), "--dataset", str(gate_env["dataset"]),
                       "--max-tokens", str(MAX_TOKENS), "--fail-on-regression", "0.01"])
    assert reg.exit_code == 1, reg.output
    assert reg.output.strip().splitlines()[-1].startswith("REGRESSION beyond 0.01: kl_mean ")
    missing = _run(["diff", str(tmp_path / "nope.gguf"), str(gate_env["ggufs"]["Q2_K"])])
    assert missing.exit_code == 2 and "not found" in missing.output
