"""MLflow runs and model versions for GGUFs (embedded SQLite store, in-process): tags, params, metrics, idempotent
registration (also two processes racing), alias gating, download, audit export; through the CLI where it matters."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from registry.audit import AuditLog, event_hash
from registry.client import PromotionRefused, RegistryError, mlflow_client
from registry.registration import promote, register_gguf
from quantgate.transfer_view import PLAIN_MIN_BYTES

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cli(store, monkeypatch):
    from quantgate.cli import app

    monkeypatch.setenv("QUANTGATE_STORE_DIR", str(store.settings.store_dir))
    for var in ("QUANTGATE_MLFLOW_URI", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "QUANTGATE_AUDIT_DB_URL"):
        monkeypatch.delenv(var, raising=False)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


def test_versions_carry_tags_params_metrics_and_reports(store):
    c = mlflow_client(store.settings)
    assert store.model.startswith("tiny-llama-") and store.model == f"tiny-llama-{store.art_pass.source_sha256[:8]}"
    v1 = c.get_model_version(store.model, store.passing.version)
    v2 = c.get_model_version(store.model, store.failing.version)
    assert v1.tags["sha256"] == store.art_pass.sha256 and v1.tags["job_key"] == store.art_pass.job_key
    assert v1.tags["verdict"] == "passed" and v1.tags["gate_set"] == "default-v1" and "rejected" not in v1.tags
    assert v1.tags["file_type"] == "MOSTLY_Q4_K_M" and store.art_pass.file_type == 15
    assert v1.tags["source"] == "tiny-llama" and v1.tags["precision"] == "Q4_K_M"
    from registry.views import FILTER_TAGS, MACHINE_TAGS

    assert set(v1.tags) <= set(FILTER_TAGS) | set(MACHINE_TAGS)  # trimmed: bpw, source SHA-256 live in the run
    assert v2.tags["verdict"] == "failed" and v2.tags["rejected"] == "true"
    run = c.get_run(v1.run_id)
    p, m = run.data.params, run.data.metrics
    assert p["source_sha256"] == store.art_pass.source_sha256 and p["precision"] == "Q4_K_M"
    assert p["job_key"] == store.art_pass.job_key and p["tool_version"] and p["calibration_sha256"] == "c" * 64
    assert p["threshold.kl_mean_le_0.05"] == "<= 0.05"
    assert m["gate.kl_mean_le_0.05"] == pytest.approx(0.012) and m["file_size_bytes"] == store.art_pass.nbytes
    assert m["bits_per_weight"] == pytest.approx(store.art_pass.bits_per_weight) and "timing.total_s" in m
    assert m["val.code.kl_mean"] == pytest.approx(0.018)
    arts = {a.path for a in c.list_artifacts(v1.run_id, "reports/validation_json")}
    assert arts == {"reports/validation_json/validation.json"}
    assert [a.path for a in c.list_artifacts(v1.run_id, "validation")] == ["validation/verdict.json"]
    assert "audit/events.jsonl" in {a.path for a in c.list_artifacts(v1.run_id, "audit")}
    with AuditLog(store.settings.audit_db_url) as log:
        reg = [e for e in log.events(model=store.model) if e.action == "register"]
    assert {(e.version, e.verdict) for e in reg} >= {(store.passing.version, "passed"),
                                                     (store.failing.version, "failed")}
    assert v1.tags["audit_event_hash"] in {e.hash for e in reg}


def test_registering_the_same_artifact_again_returns_the_existing_version(store):
    again = register_gguf(store.art_pass.path, settings=store.settings, verdict=store.verdict_pass,
                          artifact=store.art_pass)
    assert not again.created and again.version == store.passing.version and again.run_id == store.passing.run_id
    c = mlflow_client(store.settings)
    assert len(c.search_model_versions(f"name='{store.model}' and tags.sha256='{store.art_pass.sha256}'")) == 1


def test_verdict_for_another_artifact_is_rejected(store):
    with pytest.raises(RegistryError, match="verdict is for artifact"):
        register_gguf(store.art_pass.path, settings=store.settings, verdict=store.verdict_fail)


_RACER = """
import json, sys, time
from pathlib import Path
from registry.config import RegistrySettings
from registry.registration import register_gguf
store_dir, gguf, go = sys.argv[1], sys.argv[2], Path(sys.argv[3])
s = RegistrySettings.from_env(env={"QUANTGATE_STORE_DIR": store_dir})
import mlflow  # pay the import before the start line
print("ready", flush=True)
while not go.exists():
    time.sleep(0.01)
rv = register_gguf(gguf, settings=s, model_name="race-model")
print(json.dumps(rv.to_dict()))
"""


def test_two_processes_racing_register_one_version(store, tmp_path, cli):
    go = tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, str(store.settings.store_dir), store.art_pass.path,
                               str(go)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:  # both have paid their imports (no fixed sleep: as long as the machine needs, no longer)
        assert p.stdout.readline().strip() == "ready", p.communicate(timeout=60)[1][-2000:]
    go.touch()
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=180)
        assert p.returncode == 0, err[-2000:]
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert outs[0]["version"] == outs[1]["version"] == "1"
    assert sorted(o["created"] for o in outs) == [False, True]
    c = mlflow_client(store.settings)
    versions = c.search_model_versions("name='race-model'")
    assert len(versions) == 1 and versions[0].tags["verdict"] == "unvalidated"
    # an unvalidated version cannot get an alias either
    r = cli("promote", "race-model", "1", "validated")
    assert r.exit_code == 1 and "unvalidated" in r.output


def test_promote_passing_version_and_refuse_failing_one(store, cli):
    r = cli("promote", store.model, store.passing.version, "validated", "--reason", "gate passed")
    assert r.exit_code == 0, r.output
    r = cli("promote", store.model, store.passing.version, "q4_k_m")
    assert r.exit_code == 0, r.output
    c = mlflow_client(store.settings)
    assert str(c.get_model_version_by_alias(store.model, "validated").version) == store.passing.version
    r = cli("promote", store.model, store.failing.version, "production")
    assert r.exit_code == 1
    assert "refused" in r.output and "failed" in r.output
    from mlflow.exceptions import MlflowException

    with pytest.raises(MlflowException):
        c.get_model_version_by_alias(store.model, "production")
    with pytest.raises(PromotionRefused):
        promote(store.model, store.failing.version, "validated", settings=store.settings)
    assert str(c.get_model_version_by_alias(store.model, "validated").version) == store.passing.version
    assert c.get_model_version(store.model, store.failing.version).tags["rejected"] == "true"
    with AuditLog(store.settings.audit_db_url) as log:
        evs = log.events(model=store.model)
    refusals = [e for e in evs if e.action == "refuse" and e.version == store.failing.version]
    assert {e.config["alias"] for e in refusals} >= {"production", "validated"}
    assert all(e.verdict == "failed" and e.actor["user"] for e in refusals)
    promos = [e for e in evs if e.action == "promote"]
    assert {(e.version, e.config["alias"]) for e in promos} >= {(store.passing.version, "validated")}
    r = cli("promote", store.model, store.passing.version, "latest")
    assert r.exit_code == 2 and "invalid alias" in r.output


def test_cli_lists_shows_and_downloads_by_alias(store, cli, tmp_path):
    promote(store.model, store.passing.version, "validated", settings=store.settings)
    r = cli("models", "list", "--json")
    assert r.exit_code == 0, r.output
    rows = {m["name"]: m for m in json.loads(r.output)}
    assert rows[store.model]["aliases"]["validated"] == int(store.passing.version)
    r = cli("models", "show", store.model, "--json")
    assert r.exit_code == 0, r.output
    shown = {v["version"]: v for v in json.loads(r.output)}
    assert "validated" in shown[store.passing.version]["aliases"]
    assert shown[store.failing.version]["tags"]["verdict"] == "failed"
    r = cli("models", "download", f"{store.model}@validated", "--out", str(tmp_path / "dl"))
    assert r.exit_code == 0, r.output
    got = tmp_path / "dl" / Path(store.art_pass.path).name
    assert got.read_bytes() == Path(store.art_pass.path).read_bytes()
    # not a terminal and a file below PLAIN_MIN_BYTES: no plain lines (the receiver still gets every byte: below)
    assert store.art_pass.nbytes < PLAIN_MIN_BYTES and f"download {got.name}:" not in r.output
    r = cli("models", "download", f"{store.model}@validated", "--out", str(tmp_path / "dlq"), "--quiet")
    assert r.exit_code == 0 and f"download {got.name}:" not in r.output
    # the models:/ spelling, and the byte progress the CLI's bar shows
    from registry.queries import download

    seen = []
    path = download(f"models:/{store.model}/{store.passing.version}", tmp_path / "dl2", settings=store.settings,
                    progress=lambda done, total, what: seen.append((done, total, what)))
    assert path.read_bytes() == got.read_bytes()
    assert seen[-1] == (store.art_pass.nbytes, store.art_pass.nbytes, f"download {got.name}")
    assert not [p for p in (tmp_path / "dl").iterdir() if p.name.startswith(".")]  # no temp leftovers
    with AuditLog(store.settings.audit_db_url) as log:
        dl = [e for e in log.events(model=store.model) if e.action == "download"]
    assert dl and dl[-1].outputs[0]["sha256"] == store.art_pass.sha256
    r = cli("models", "download", f"{store.model}@nosuch", "--out", str(tmp_path / "dl"))
    assert r.exit_code == 2 and "no alias" in r.output


def test_audit_export_writes_jsonl_and_attaches_it(store, cli, tmp_path):
    out = tmp_path / "v1.jsonl"
    r = cli("audit", "export", "--model", store.model, "--version", store.passing.version, "--out", str(out))
    assert r.exit_code == 0, r.output
    events = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["action"] for e in events][:3] == ["quantize", "validate", "register"]
    assert all(e["artifact_sha256"] == store.art_pass.sha256 or e["version"] == store.passing.version for e in events)
    for e in events:
        h = e.pop("hash")
        assert event_hash(e) == h
    c = mlflow_client(store.settings)
    run_id = c.get_model_version(store.model, store.passing.version).run_id
    assert "audit/v1.jsonl" in {a.path for a in c.list_artifacts(run_id, "audit")}
    r = cli("audit", "verify")
    assert r.exit_code == 0 and "intact" in r.output


def test_cli_register_with_verdict_and_artifact_json_is_idempotent(store, cli, tmp_path):
    art = store.art_fail
    (tmp_path / "art.json").write_text(json.dumps(art.to_dict()))
    (tmp_path / "verdict.json").write_text(json.dumps(store.verdict_fail.to_dict()))
    (tmp_path / "junit.xml").write_text("<testsuite tests='1' failures='1'/>")
    args = ["register", art.path, "--verdict", str(tmp_path / "verdict.json"), "--artifact", str(tmp_path / "art.json"),
            "--model-name", "cli-model", "--report", f"junit={tmp_path / 'junit.xml'}", "--json"]
    r = cli(*args)
    assert r.exit_code == 0, r.output
    first = json.loads(r.output)
    assert first["created"] and first["verdict"] == "failed" and first["version"] == "1"
    r = cli(*args)
    assert r.exit_code == 0 and json.loads(r.output)["created"] is False
    c = mlflow_client(store.settings)
    assert [a.path for a in c.list_artifacts(first["run_id"], "reports/junit")] == ["reports/junit/junit.xml"]
    r = cli("register", art.path, "--report", "bogus=x")
    assert r.exit_code == 2 and "--report expects" in r.output


def test_pipeline_register_step_aliases_only_passing_versions(tiny_artifacts, tmp_path, monkeypatch):
    """quantgate.jobs.register_step: a passing version gets its mix alias (audited promote); a failing one none;
    registering again promotes nothing more."""
    from dataclasses import asdict

    from quantgate.jobs import register_step
    from registry.client import mlflow_client
    from registry.config import RegistrySettings
    from tests.registry.conftest import make_verdict, validated

    monkeypatch.setenv("QUANTGATE_STORE_DIR", str(tmp_path / "mlruns-store"))
    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", f"sqlite:///{tmp_path / 'audit.db'}")
    _, _, q4, q8 = tiny_artifacts
    for art, ok in ((q4, True), (q8, False)):
        validated(make_verdict(art, ok), f"sqlite:///{tmp_path / 'audit.db'}")
    ok = register_step(q4.to_dict(), asdict(make_verdict(q4, True)), model_name="aliased")
    bad = register_step(q8.to_dict(), asdict(make_verdict(q8, False)), model_name="aliased")
    again = register_step(q4.to_dict(), asdict(make_verdict(q4, True)), model_name="aliased")
    assert ok["alias"] == "q4_k_m" and "alias" not in bad and "alias" not in again and not again["created"]
    settings = RegistrySettings.from_env()
    client = mlflow_client(settings)
    assert str(client.get_model_version_by_alias("aliased", "q4_k_m").version) == ok["version"]
    assert {k: str(v) for k, v in client.get_registered_model("aliased").aliases.items()} == {"q4_k_m": ok["version"]}
    with AuditLog(settings.audit_db_url) as log:
        assert [e.action for e in log.events() if e.action == "promote"] == ["promote"]
        assert log.verify().ok


def test_cli_prints_hostile_tags_literally(store, cli):
    """A tag anyone with MLflow access can set is shown as text by `models show`, never read as Rich markup."""
    c = mlflow_client(store.settings)
    hostile = "[link=https://evil.example]x[/link] [/b] \x1b[31mred"
    c.set_model_version_tag(store.model, store.passing.version, "note", hostile)
    try:
        r = cli("models", "show", store.model, str(store.passing.version))
        assert r.exit_code == 0, r.output
        assert "[link=https://evil.example]x[/link] [/b] \\x1b[31mred" in r.output
        assert "\x1b[31m" not in r.output
    finally:
        c.delete_model_version_tag(store.model, store.passing.version, "note")


def test_audit_export_without_attach_reads_only_the_audit_db(tmp_path):
    """`audit export --no-attach` (no version) writes the JSONL from the audit DB alone: it never creates an MLflow
    store (a read-only command has no side effect there, and skipping MLflow's schema migration saves ~9 s)."""
    from registry.audit import record_event
    from registry.config import RegistrySettings
    from registry.queries import export_events

    s = RegistrySettings.from_env(env={"QUANTGATE_STORE_DIR": str(tmp_path / "store"),
                                       "QUANTGATE_AUDIT_DB_URL": f"sqlite:///{tmp_path / 'audit.db'}"})
    record_event("quantize", db_url=s.audit_db_url, model="m", config={"mix": "Q4_K_M"})
    path, n = export_events("m", None, tmp_path / "m.jsonl", settings=s, attach=False)
    assert n == 1 and [json.loads(ln)["action"] for ln in path.read_text().splitlines()] == ["quantize"]
    assert not (tmp_path / "store").exists(), sorted(p.name for p in (tmp_path / "store").iterdir())
