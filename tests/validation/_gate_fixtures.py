"""Session fixtures for the gate/report/diff tests: tiny model quantized to Q8_0, Q2_K, Q4_K_M, Q5_K_M, a model
from another seed, and validation runs shared between test files (each run costs seconds)."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.validation._tiny import make_tiny_model, quantize_to, write_samples

MAX_TOKENS = 32


@pytest.fixture(scope="session")
def gate_env(tmp_path_factory) -> dict:
    """Model, GGUFs, dataset and a shared logits cache folder."""
    d = tmp_path_factory.mktemp("gate")
    model = make_tiny_model(d / "model")
    ggufs = {p: quantize_to(model, d / f"tiny-{p}.gguf", p) for p in ("Q8_0", "Q2_K", "Q4_K_M", "Q5_K_M")}
    return {"dir": d, "model": model, "ggufs": ggufs, "dataset": write_samples(d / "eval.jsonl"),
            "cache": d / "cache"}


@pytest.fixture(scope="session")
def other_model_gguf(gate_env) -> Path:
    """A Q8_0 GGUF of a different model with the same architecture (another seed)."""
    d = gate_env["dir"]
    return quantize_to(make_tiny_model(d / "other", seed=5), d / "other-Q8_0.gguf", "Q8_0")


def run_validate(env: dict, precision: str, threshold: float = 0.01, metric: str = "kl_mean", **kw):
    """gate_and_report() one of the env's GGUFs with a single `metric <= threshold` gate."""
    from validation.gate import gate_and_report
    from validation.thresholds import default_gates

    gguf = kw.pop("gguf", None) or env["ggufs"][precision]
    return gate_and_report(env["model"], gguf, default_gates(threshold, metric), dataset=env["dataset"],
                    max_tokens=MAX_TOKENS, cache_dir=env["cache"], **kw)


@pytest.fixture(scope="session")
def verdicts(gate_env) -> dict:
    """Verdicts of Q8_0 (passes kl_mean <= 0.01) and Q2_K (fails it), with their reports written."""
    return {p: run_validate(gate_env, p) for p in ("Q8_0", "Q2_K")}
