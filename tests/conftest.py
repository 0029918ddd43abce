"""Shared fixtures: the ggml oracle gate and small deterministic inputs."""
from __future__ import annotations

import os

import pytest

from tests import ggml_oracle


def oracle_required() -> bool:
    """CI sets QUANTGATE_REQUIRE_ORACLE=1: a missing oracle is then a failure, never a silent skip."""
    return os.environ.get("QUANTGATE_REQUIRE_ORACLE", "") not in ("", "0")


@pytest.fixture
def require_oracle():
    """Skip (locally) or fail (CI) when llama-cpp-python's libggml is not importable."""
    if not ggml_oracle.available():
        msg = "ggml oracle (llama-cpp-python) not installed: bash scripts/build_oracle.sh nofma --install .venv/bin/python"
        if oracle_required():
            pytest.fail(msg)
        pytest.skip(msg)
    return ggml_oracle
