"""Fixtures for the precision analyzer tests: the tiny Llama of tests/validation/_tiny.py, a calibration JSONL,
and one profile of it built into a session cache (so each test reuses the forward passes)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.validation._tiny import make_tiny_model, write_samples

CHUNK = 64
TYPES = ("Q4_K", "Q8_0", "F16")
MEASURE = {"measure_seqs": 2, "measure_len": 32}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("sens") / "model")


@pytest.fixture(scope="session")
def calib_jsonl(tmp_path_factory) -> Path:
    return write_samples(tmp_path_factory.mktemp("calib") / "calib.jsonl", seed=3, n=12)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def tiny_profile(tiny_model, calib_jsonl, cache_dir):
    from analyzer.cache import CalibrationCache
    from analyzer.profile import build_profile

    with CalibrationCache(cache_dir) as cache:
        return build_profile(tiny_model, calib_jsonl, chunk_size=CHUNK, candidate_types=TYPES, cache=cache,
                             **MEASURE)
