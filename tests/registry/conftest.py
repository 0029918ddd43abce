"""Shared fixtures: tiny real GGUFs (sample checkpoint + quantize_model), fabricated verdicts (the gate is a later
issue), and one embedded MLflow store (SQLite) with a passing and a failing version registered."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from core.records import GateResult, QuantizedArtifact, Verdict

TINY = dict(n_layer=1, n_embd=256, n_ff=256, n_head=2, n_head_kv=1, n_vocab=256)


def make_verdict(art: QuantizedArtifact, passed: bool) -> Verdict:
    """A verdict in the gate's shape: kl_mean under a threshold overall and per category."""
    kl = 0.012 if passed else 0.21
    gates = [
        GateResult("structural:verify", "structural", passed=True, detail="valid GGUF"),
        GateResult("kl_mean<=0.05", "metric", "kl_mean", "<=", 0.05, kl, None, kl <= 0.05),
        GateResult("top1_agreement>=0.9", "metric", "top1_agreement", ">=", 0.9, 0.96, None, True),
        GateResult("code:kl_mean<=0.08", "metric", "kl_mean", "<=", 0.08, kl * 1.5, "code", kl * 1.5 <= 0.08),
    ]
    return Verdict(artifact_sha256=art.sha256, passed=passed, gates=gates, gate_set="default-v1",
                   metrics={"kl_mean": kl, "top1_agreement": 0.96}, created_at="2026-01-01T00:00:00Z")


def validated(verdict: Verdict, db_url: str) -> Verdict:
    """Record the "validate" event quantgate's gate appends (registry.trust.record_validation), so registration
    finds the verdict backed by the audit chain; returns the verdict."""
    from registry.trust import record_validation

    record_validation(verdict, db_url=db_url)
    return verdict


def make_validation_json(art: QuantizedArtifact, baseline: Path, out: Path) -> Path:
    """An EvalReport-shaped JSON: real per-tensor errors (validation.tensor_error) and fabricated per-category
    metrics (the evaluator's numbers are not needed to test the registry)."""
    from validation.tensor_error import per_tensor_errors

    per_tensor = [t.to_dict() for t in per_tensor_errors(baseline, art.path)]
    cats = {c: {"kl_mean": k, "top1_agreement": a, "accuracy_drop": d, "ln_ppl_ratio": k / 2}
            for c, k, a, d in (("code", 0.018, 0.95, 0.004), ("chat", 0.010, 0.97, 0.001), ("math", 0.014, 0.96, 0.0))}
    rep = {"schema_version": 1, "dataset": {"path": "eval.jsonl", "sha256": "c" * 64},
           "overall": {"kl_mean": 0.012, "top1_agreement": 0.96}, "per_category": cats, "per_tensor": per_tensor,
           "timings": {"total_seconds": 1.5}}
    out.write_text(json.dumps(rep, indent=2))
    return out


@dataclass
class Store:
    settings: object
    work: Path
    model: str
    passing: object   # RegisteredVersion
    failing: object
    art_pass: QuantizedArtifact
    art_fail: QuantizedArtifact
    verdict_pass: Verdict
    verdict_fail: Verdict


@pytest.fixture(scope="session")
def tiny_artifacts(tmp_path_factory):
    """Two real GGUFs of one tiny sample checkpoint: Q4_K_M (will pass) and Q8_0 (will fail)."""
    from core.records import QuantizeRequest
    from quantgate.pipeline import quantize_model
    from quantgate.sample import SampleShape, make_sample_checkpoint

    work = tmp_path_factory.mktemp("reg-artifacts")
    src = make_sample_checkpoint(work / "tiny-llama", SampleShape(**TINY), seed=3)
    q4 = quantize_model(QuantizeRequest(source=src, out=work / "tiny-q4_k_m.gguf", precision="Q4_K_M", threads=1))
    q8 = quantize_model(QuantizeRequest(source=src, out=work / "tiny-q8_0.gguf", precision="Q8_0", threads=1))
    return work, src, q4, q8


@pytest.fixture(scope="session")
def store(tmp_path_factory, tiny_artifacts) -> Store:
    """An embedded store (SQLite + local artifacts) with v1 passing (+ validation JSON) and v2 failing."""
    from registry.config import RegistrySettings
    from registry.registration import register_gguf

    work, src, q4, q8 = tiny_artifacts
    root = tmp_path_factory.mktemp("reg-store")
    settings = RegistrySettings.from_env(env={"QUANTGATE_STORE_DIR": str(root / "mlruns-store")})
    vp, vf = make_verdict(q4, True), make_verdict(q8, False)
    vjson = make_validation_json(q4, src, root / "validation.json")
    from registry.audit import record_event

    for art in (q4, q8):  # what the pipeline records after writing a GGUF
        record_event("quantize", db_url=settings.audit_db_url, artifact_sha256=art.sha256, job_key=art.job_key,
                     inputs=[{"role": "source", "path": art.source, "sha256": art.source_sha256}],
                     outputs=[art.path], config=art.recipe.__dict__, detail=f"quantized to {art.recipe.precision}")
    validated(vp, settings.audit_db_url)
    validated(vf, settings.audit_db_url)
    passing = register_gguf(q4.path, settings=settings, verdict=vp, artifact=q4,
                            reports={"validation_json": vjson})
    failing = register_gguf(q8.path, settings=settings, verdict=vf, artifact=q8)
    return Store(settings, root, passing.model_name, passing, failing, q4, q8, vp, vf)
