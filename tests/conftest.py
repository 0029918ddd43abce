"""Shared fixtures: the ggml oracle gate and small deterministic inputs."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from tests import ggml_oracle


def oracle_required() -> bool:
    """CI sets QUANTGATE_REQUIRE_ORACLE=1: a missing oracle is then a failure, never a silent skip."""
    return os.environ.get("QUANTGATE_REQUIRE_ORACLE", "") not in ("", "0")


def require_llamacpp_src() -> "Path":
    """The pinned llama.cpp source tree (for its convert_hf_to_gguf.py); skip locally, fail in CI, when absent."""
    src = ggml_oracle.llamacpp_src()
    if not (src / "convert_hf_to_gguf.py").is_file():
        msg = f"pinned llama.cpp source not found at {src} (scripts/build_oracle.sh extracts it)"
        if oracle_required():
            pytest.fail(msg)
        pytest.skip(msg)
    return src


@pytest.fixture(scope="session", autouse=True)
def _isolated_store(tmp_path_factory):
    """Every test session gets its own MLflow store, audit DB and cache: tests never touch the user's."""
    root = tmp_path_factory.mktemp("qg-store")
    saved = {k: os.environ.get(k) for k in ("QUANTGATE_STORE_DIR", "QUANTGATE_AUDIT_DB_URL", "QUANTGATE_CACHE_DIR")}
    os.environ["QUANTGATE_STORE_DIR"] = str(root / "store")
    os.environ["QUANTGATE_AUDIT_DB_URL"] = f"sqlite:///{root / 'audit.db'}"
    os.environ.setdefault("QUANTGATE_CACHE_DIR", str(root / "cache"))
    yield root
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def require_oracle():
    """Skip (locally) or fail (CI) when llama-cpp-python's libggml is not importable."""
    if not ggml_oracle.available():
        msg = "ggml oracle (llama-cpp-python) not installed: bash scripts/build_oracle.sh nofma --install .venv/bin/python"
        if oracle_required():
            pytest.fail(msg)
        pytest.skip(msg)
    return ggml_oracle


def pytest_terminal_summary(terminalreporter) -> None:
    """Where the HTML report screenshots of this run are (CI keeps the folder as a build artifact)."""
    chromium = sys.modules.get("tests._chromium")
    if chromium is not None and chromium.TAKEN:
        terminalreporter.write_line(f"report screenshots ({len(chromium.TAKEN)}): {chromium.SHOTS}")
