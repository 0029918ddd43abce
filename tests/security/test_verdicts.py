"""Issue 12 section 1: the verdict a version carries is earned (quantgate's own "validate" event in the audit chain,
recomputed from its gates), never asserted by a JSON file, an MLflow tag, a Celery message or an alias set behind
quantgate's back. Each test first mounts the attack on a real MLflow SQLite store and a real audit chain."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from core.errors import QuantGateError
from core.records import Verdict
from registry.audit import AuditLog, record_event
from registry.client import PromotionRefused, VerdictRefused, mlflow_client
from registry.config import RegistrySettings
from registry.registration import promote, register_gguf
from registry.trust import VERDICT_KEY_ENV, gates_pass, sign, validation_config, verdict_digest
from tests.registry.conftest import make_verdict, tiny_artifacts, validated  # noqa: F401 - fixture

ENV_VARS = ("QUANTGATE_STORE_DIR", "QUANTGATE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
            "QUANTGATE_AUDIT_DB_URL", VERDICT_KEY_ENV, "QUANTGATE_MODEL_NAME")


@pytest.fixture(scope="module")
def reg(tiny_artifacts, tmp_path_factory):  # noqa: F811
    """A fresh store of its own: the q4 (passing) and q8 (failing) verdicts validated in the chain, nothing
    registered yet; the CLI sees the same store through the environment."""
    root = tmp_path_factory.mktemp("sec-verdicts")
    store = root / "mlruns-store"
    store.mkdir()
    uri = f"sqlite:///{store / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        for k in ENV_VARS:
            mp.delenv(k, raising=False)
        mp.setenv("QUANTGATE_STORE_DIR", str(store))
        mp.setenv("QUANTGATE_MLFLOW_URI", uri)
        mp.setenv("MLFLOW_REGISTRY_URI", uri)
        mp.setenv("QUANTGATE_AUDIT_DB_URL", f"sqlite:///{store / 'audit.db'}")
        s = RegistrySettings.from_env()
        _, src, q4, q8 = tiny_artifacts
        vp, vf = validated(make_verdict(q4, True), s.audit_db_url), validated(make_verdict(q8, False), s.audit_db_url)
        runner = CliRunner()
        yield SimpleNamespace(settings=s, q4=q4, q8=q8, vp=vp, vf=vf, root=root, src=src,
                              cli=lambda *a: runner.invoke(__import__("quantgate.cli", fromlist=["app"]).app,
                                                           [str(x) for x in a]))


def _events(s) -> list:
    with AuditLog(s.audit_db_url) as log:
        return log.events()


def _versions(s, model: str) -> list:
    return mlflow_client(s).search_model_versions(f"name='{model}'")


def _write(tmp_path: Path, name: str, d: dict) -> Path:
    p = tmp_path / name
    p.write_text(json.dumps(d, indent=2))
    return p


def test_forged_passed_verdict_with_a_failing_gate_is_refused(reg, tmp_path):
    """Attack: verdict.json edited to passed: true while its kl gate still fails; `register` used to accept it and
    tag the version passed. Now: exit 1, a "refuse" event, no version."""
    forged = reg.vf.to_dict() | {"passed": True}
    assert not gates_pass(forged["gates"])
    n = len(_events(reg.settings))
    r = reg.cli("register", reg.q8.path, "--verdict", _write(tmp_path, "forged.json", forged),
                "--model-name", "forged-1")
    assert r.exit_code == 1, r.output
    assert "contradicts its gates" in r.output and "kl_mean<=0.05" in r.output
    assert _versions(reg.settings, "forged-1") == []
    new = _events(reg.settings)[n:]
    assert [e.action for e in new] == ["refuse"]
    assert new[0].config["action"] == "register" and new[0].config["claimed"] == "passed"
    assert new[0].artifact_sha256 == reg.q8.sha256


def test_consistent_verdict_the_chain_never_saw_is_refused(reg, tmp_path):
    """Attack: a self-consistent verdict (every gate flipped to passed) for the failing artifact, and a genuine
    passing verdict with one metric edited. Neither was produced by quantgate's validation: both refused. The
    genuine verdict file registers (exit 0): the check is not a blanket refusal."""
    fake = reg.vf.to_dict() | {"passed": True}
    fake["gates"] = [g | {"passed": True, "value": 0.001} for g in fake["gates"]]
    assert gates_pass(fake["gates"])
    r = reg.cli("register", reg.q8.path, "--verdict", _write(tmp_path, "fake.json", fake), "--model-name", "forged-2")
    assert r.exit_code == 1 and "no validation recorded in the audit chain produced this verdict" in r.output, r.output

    edited = reg.vp.to_dict()
    edited["metrics"] = edited["metrics"] | {"kl_mean": 0.0001}
    r = reg.cli("register", reg.q4.path, "--verdict", _write(tmp_path, "edited.json", edited), "--model-name", "forged-2")
    assert r.exit_code == 1, r.output
    assert _versions(reg.settings, "forged-2") == []

    genuine = reg.vp.to_dict() | {"report_paths": {"verdict": "/moved/elsewhere/verdict.json"}}  # paths may move
    r = reg.cli("register", reg.q4.path, "--verdict", _write(tmp_path, "genuine.json", genuine),
                "--model-name", "forged-2", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["verdict"] == "passed" and out["created"]
    reg_ev = [e for e in _events(reg.settings) if e.action == "register" and e.model == "forged-2"]
    assert reg_ev[0].config["verdict_sha256"] == verdict_digest(reg.vp)
    run = mlflow_client(reg.settings).get_run(out["run_id"])
    assert run.data.tags["quantgate.audit_event_hash"] == reg_ev[0].hash  # second anchor, on the run


def test_celery_register_message_cannot_register_an_unvalidated_artifact_as_passed(reg):
    """Attack: one JSON message to the register task (tasks.tasks.register -> quantgate.jobs.register_step) with a
    verdict saying passed for an artifact that was never validated as passing. Refused with a QuantGateError
    (the task fails at once, no retry), nothing registered, no alias."""
    from quantgate.jobs import register_step

    msg = {"artifact": reg.q8.to_dict(),
           "verdict": {"artifact_sha256": reg.q8.sha256, "passed": True, "gate_set": "default-v1",
                       "gates": [{"name": "kl_mean<=0.05", "kind": "metric", "passed": True}]}}
    msg = json.loads(json.dumps(msg))  # exactly what crosses the broker
    with pytest.raises(VerdictRefused) as ei:
        register_step(msg["artifact"], msg["verdict"], model_name="celery-forged")
    assert isinstance(ei.value, QuantGateError)
    assert _versions(reg.settings, "celery-forged") == []
    # the genuine failed verdict still registers (as failed, without an alias)
    out = register_step(reg.q8.to_dict(), reg.vf.to_dict(), model_name="celery-forged")
    assert out["verdict"] == "failed" and "alias" not in out


def test_promote_reads_the_chain_not_the_verdict_tag(reg):
    """Attack: MLflow access only: set verdict=passed (and drop rejected, and even point the sha256 tag at the
    passing artifact) on a failed version, then promote it to production. Refused, audited; a genuinely passing
    version is promoted."""
    s = reg.settings
    bad = register_gguf(reg.q8.path, settings=s, verdict=reg.vf, artifact=reg.q8, model_name="tagged")
    good = register_gguf(reg.q4.path, settings=s, verdict=reg.vp, artifact=reg.q4, model_name="tagged")
    c = mlflow_client(s)
    c.set_model_version_tag("tagged", bad.version, "verdict", "passed")
    c.delete_model_version_tag("tagged", bad.version, "rejected")
    with pytest.raises(PromotionRefused, match="failed in the audit chain"):
        promote("tagged", bad.version, "production", settings=s)
    c.set_model_version_tag("tagged", bad.version, "sha256", reg.q4.sha256)
    r = reg.cli("promote", "tagged", bad.version, "production")
    assert r.exit_code == 1 and "refused" in r.output, r.output
    assert "production" not in c.get_registered_model("tagged").aliases
    refusals = [e for e in _events(s) if e.action == "refuse" and e.model == "tagged"]
    assert len(refusals) == 2 and refusals[0].config["tag_verdict"] == "passed"
    assert "MLflow says artifact" in refusals[1].config["why"]
    mv = promote("tagged", good.version, "production", settings=s)
    assert "production" in mv.aliases


def test_alias_set_behind_quantgates_back_is_reported(reg, tmp_path):
    """Attack: MlflowClient().set_registered_model_alias on a failed version. `models check` and `audit verify`
    list it (exit 1); the compliance report shows it in red; once removed, both pass again."""
    from registry.compliance import build_report, render

    s = reg.settings
    bad = register_gguf(reg.q8.path, settings=s, verdict=reg.vf, artifact=reg.q8, model_name="sneaky")
    c = mlflow_client(s)
    r = reg.cli("models", "check")
    assert r.exit_code == 0, r.output
    c.set_registered_model_alias("sneaky", "production", bad.version)
    try:
        r = reg.cli("models", "check", "--json")
        assert r.exit_code == 1, r.output
        found = json.loads(r.output)["findings"]
        assert [(f["kind"], f["model"], f["version"], f["alias"]) for f in found] == [
            ("alias", "sneaky", bad.version, "production")]
        r = reg.cli("audit", "verify")
        assert r.exit_code == 1 and "production" in r.output and "audit chain intact" in r.output, r.output
        rep = build_report("sneaky", bad.version, settings=s)
        assert rep["unbacked_aliases"] == ["production"] and rep["verdict"] == "failed"
        html = render(rep, "html")
        assert '<span class="bad unbacked-alias" style="color:#c62828">production' in html
        assert 'id="unbacked-aliases"' in html
        assert "UNBACKED ALIAS(ES): production" in render(rep, "md")
    finally:
        c.delete_registered_model_alias("sneaky", "production")
    assert reg.cli("models", "check").exit_code == 0
    assert reg.cli("audit", "verify").exit_code == 0


def test_hmac_key_makes_audit_db_write_access_insufficient(reg, monkeypatch, tmp_path):
    """With QUANTGATE_VERDICT_KEY set, validate signs and register/promote require the signature. Attack: audit-DB
    write access (no key) appends a well-formed, correctly hashed validate event for a fabricated passing verdict:
    refused. Unsigned events from before the key: refused. A signed validation registers and promotes."""
    s = reg.settings
    older = register_gguf(reg.q4.path, settings=s, verdict=reg.vp, artifact=reg.q4, model_name="pre-key")
    monkeypatch.setenv(VERDICT_KEY_ENV, "k3y-for-tests")
    with pytest.raises(VerdictRefused, match="no valid signature"):  # validated before the key existed
        register_gguf(reg.q4.path, settings=s, verdict=reg.vp, artifact=reg.q4, model_name="signed")

    fake = Verdict.from_dict(reg.vf.to_dict() | {"passed": True, "created_at": "2026-02-02T00:00:00Z"})
    for g in fake.gates:
        g.passed = True
    cfg = validation_config(fake, b"guessed-key")  # the attacker's own key: a signature, just not ours
    record_event("validate", db_url=s.audit_db_url, artifact_sha256=fake.artifact_sha256, config=cfg,
                 verdict="passed")
    with pytest.raises(VerdictRefused, match="no valid signature"):
        register_gguf(reg.q8.path, settings=s, verdict=fake, artifact=reg.q8, model_name="signed")
    assert _versions(s, "signed") == []

    signed = Verdict.from_dict(reg.vp.to_dict() | {"created_at": "2026-03-03T00:00:00Z"})
    ev = validated(signed, s.audit_db_url)  # what validate_artifact does: signs with the key from the env
    with AuditLog(s.audit_db_url) as log:
        last = [e for e in log.events(artifact_sha256=reg.q4.sha256) if e.action == "validate"][-1]
    assert last.config["signature"] == sign(b"k3y-for-tests", reg.q4.sha256, verdict_digest(ev), "passed",
                                            "default-v1")
    rv = register_gguf(reg.q4.path, settings=s, verdict=signed, artifact=reg.q4, model_name="signed")
    assert rv.verdict == "passed"
    assert "validated" in promote("signed", rv.version, "validated", settings=s).aliases
    # a version registered before the key (unsigned register event) cannot be promoted while the key is set
    with pytest.raises(PromotionRefused, match="no valid signature"):
        promote("pre-key", older.version, "validated", settings=s)


def test_real_gate_records_what_registration_checks(reg, tmp_path):
    """End to end with the real gate: quantgate.pipeline.validate_artifact appends a validate event with the
    verdict's SHA-256 and per-gate results; `register --verdict` of the verdict.json it wrote is accepted, the
    same file with one gate flipped is refused."""
    from quantgate.pipeline import validate_artifact
    from tests.validation._tiny import make_tiny_model, quantize_to, write_samples
    from validation.thresholds import default_gates

    model = make_tiny_model(tmp_path / "model")
    gguf = quantize_to(model, tmp_path / "tiny-Q8_0.gguf", "Q8_0")
    v = validate_artifact(model, gguf, default_gates(5.0, "kl_mean"), dataset=write_samples(tmp_path / "eval.jsonl"),
                          max_tokens=16, cache_dir=tmp_path / "cache", report_dir=tmp_path / "reports",
                          data_docs=False)
    assert v.passed
    ev = [e for e in _events(reg.settings) if e.action == "validate" and e.artifact_sha256 == v.artifact_sha256][-1]
    assert ev.verdict == "passed" and ev.config["verdict_sha256"] == verdict_digest(v)
    assert ev.config["gates"] == [{"name": g.name, "passed": g.passed, "skipped": g.skipped} for g in v.gates]
    vjson = Path(v.report_paths["verdict"])
    flipped = json.loads(vjson.read_text())
    flipped["gates"][-1]["value"] = 99.0
    r = reg.cli("register", gguf, "--verdict", _write(tmp_path, "flipped.json", flipped), "--model-name", "real")
    assert r.exit_code == 1, r.output
    r = reg.cli("register", gguf, "--verdict", vjson, "--model-name", "real", "--json")
    assert r.exit_code == 0 and json.loads(r.output)["verdict"] == "passed", r.output
    assert reg.cli("promote", "real", "1", "validated").exit_code == 0


def test_versions_registered_before_verdict_digests(tmp_path, monkeypatch):
    """Upgrade path: a register event without `verdict_sha256` (older quantgate) counts as passed only when the chain
    holds a passing validate event of its artifact; never while a key is set. (A forged old registration with no
    validation stays unbacked.)"""
    from registry.trust import version_status

    with AuditLog(f"sqlite:///{tmp_path / 'a.db'}") as log:
        log.append("validate", artifact_sha256="a" * 64, config={"gate_set": "g"}, verdict="passed")
        log.append("register", model="old", version="1", artifact_sha256="a" * 64, config={"gate_set": "g"},
                   verdict="passed")
        log.append("register", model="old", version="2", artifact_sha256="b" * 64, config={"gate_set": "g"},
                   verdict="passed")
        evs = log.events()
    monkeypatch.delenv(VERDICT_KEY_ENV, raising=False)
    assert version_status(evs, "old", "1").ok
    b = version_status(evs, "old", "2")
    assert not b.ok and "no passing validate event" in b.reason
    assert not version_status(evs, "old", "1", b"key").ok
