"""CLI conventions people bring from other tools: --version and -h, one meaning per short flag, no wrapping in logs."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import typer.main

from core.version import __version__
from quantgate.cli import app

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quantgate.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})


def test_version_flag_and_short_help():
    r = _cli("--version")
    assert r.returncode == 0 and r.stdout.strip() == __version__
    r = _cli("-h")
    assert r.returncode == 0 and "quantize" in r.stdout
    r = _cli("validate", "-h")
    assert r.returncode == 0 and "--quantized" in r.stdout


def _short_flags() -> dict[str, set[str]]:
    """short flag -> the long names it stands for, over every command and subcommand."""
    seen: dict[str, set[str]] = {}

    def walk(cmd) -> None:
        for p in cmd.params:
            if getattr(p, "param_type_name", "") == "option":  # typer may vendor its own click classes
                shorts = [o for o in p.opts + p.secondary_opts if o.startswith("-") and not o.startswith("--")]
                longs = [o for o in p.opts if o.startswith("--")]
                for s in shorts:
                    seen.setdefault(s, set()).update(longs)
        for sub in getattr(cmd, "commands", {}).values():
            walk(sub)

    walk(typer.main.get_command(app))
    return seen


def test_one_meaning_per_short_flag():
    clashes = {s: sorted(longs) for s, longs in _short_flags().items() if len(longs) > 1}
    assert clashes == {}
    assert _short_flags()["-q"] == {"--quiet"}


def test_no_wrapping_when_not_a_terminal(tmp_path):
    long_name = "x" * 150 + ".gguf"
    r = _cli("verify", str(tmp_path / long_name))
    assert r.returncode == 2
    line = r.stderr.strip()
    assert line.count("\n") == 0 and long_name in line
