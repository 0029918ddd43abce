"""Validation through the workers (a failed gate is a result, not an error), the real `quantgate submit/status`
CLI against real workers, and the AUTO mix fed by the profile step."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from quantgate import jobs
from tests.tasks.conftest import QUANTGATE, ROOT, wait_for

LOOSE = ["ppl_ratio <= 1.5", "kl_mean <= 0.5"]
TIGHT = ["ppl_ratio <= 0.5"]   # a quantized model never halves the baseline's perplexity
EVAL_OPTIONS = {"max_tokens": 32, "expectations": False}
PROFILE_OPTIONS = {"chunk_size": 64, "measure_seqs": 2, "measure_len": 32}


@pytest.fixture(scope="module")
def tok_model(tmp_path_factory):
    """A tiny Llama with a tokenizer (validation and profiling need one), an eval set and a calibration set."""
    from tests.validation._tiny import make_tiny_model, write_samples

    d = tmp_path_factory.mktemp("tokmodel")
    return {"model": make_tiny_model(d / "tiny"), "eval": write_samples(d / "eval.jsonl"),
            "calib": write_samples(d / "calib.jsonl", seed=7, n=3)}


def _ended(T, job_id: str) -> bool:
    return T.job_status(job_id)["state"] in ("SUCCESS", "FAILURE")


def _audit_verdicts(url: str) -> list[tuple[str, str | None]]:
    from registry.audit import AuditLog

    with AuditLog(url) as log:
        return [(e.artifact_sha256, e.verdict) for e in log.events() if e.action == "validate"]


def test_validate_through_workers_loose_passes_tight_fails(cluster, tok_model, tmp_path, monkeypatch):
    from tasks import tasks as T

    audit_db = f"sqlite:///{tmp_path / 'audit.db'}"
    monkeypatch.setenv("QUANTGATE_AUDIT_DB_URL", audit_db)
    cluster.worker("w1", QUANTGATE_AUDIT_DB_URL=audit_db)

    def spec(gates):
        return jobs.JobSpec(model=str(tok_model["model"]), mixes=("Q8_0",), workdir=str(cluster.workdir),
                            gates=gates, dataset=str(tok_model["eval"]), options=EVAL_OPTIONS)

    loose = T.submit(spec(LOOSE))
    wait_for(lambda: _ended(T, loose), 90, "the loose-gate job")
    st = T.job_status(loose)
    assert st["state"] == "SUCCESS", st["errors"]
    assert set(st["tasks"]) == {"Q8_0:quantize", "Q8_0:validate"}
    (res,) = st["result"]["results"]
    v = res["verdict"]
    assert v["passed"] is True and v["artifact_sha256"] == res["artifact"]["sha256"]
    report = Path(v["report_paths"]["validation_json"])
    assert report.is_file() and cluster.workdir in report.parents   # on the storage every worker shares
    assert json.loads(report.read_text())["verdict"]["passed"] is True
    gguf = Path(res["artifact"]["path"])
    assert [p.name for p in gguf.parent.glob("verdict-*.json")] == [
        f"verdict-{jobs.gate_set_key(LOOSE, str(tok_model['eval']), EVAL_OPTIONS)[:16]}.json"]

    # same artifact, a gate it cannot pass: the job still succeeds, its result says failed
    tight = T.submit(spec(TIGHT))
    wait_for(lambda: _ended(T, tight), 90, "the tight-gate job")
    st2 = T.job_status(tight)
    assert st2["state"] == "SUCCESS", st2["errors"]
    (res2,) = st2["result"]["results"]
    assert res2["artifact"]["reused"] is True and res2["artifact"]["sha256"] == res["artifact"]["sha256"]
    assert res2["verdict"]["passed"] is False
    assert any(not g["passed"] and g["metric"] == "ppl_ratio" for g in res2["verdict"]["gates"])
    report2 = Path(res2["verdict"]["report_paths"]["validation_json"])
    assert report2 != report and report.is_file() and report2.is_file()   # one report per gate set
    assert len(list(gguf.parent.glob("verdict-*.json"))) == 2
    # both verdicts went through quantgate.pipeline.validate_artifact: one audit event each
    sha = res["artifact"]["sha256"]
    assert _audit_verdicts(audit_db) == [(sha, "passed"), (sha, "failed")]


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(QUANTGATE + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_cli_submit_status_watch_with_auto_mix(cluster, tok_model, tmp_path):
    import os

    from analyzer.auto import mix_sizes

    cluster.worker("w1")
    env = {**os.environ, "QUANTGATE_BROKER_URL": cluster.redis.url, "PYTHONPATH": str(ROOT)}
    params = tmp_path / "params.yaml"
    params.write_text(json.dumps({"profile": {"calib": str(tok_model["calib"]), **PROFILE_OPTIONS},
                                  "auto": {"target": "Q4_K_M"}}))
    sub = _cli(["submit", "--params", str(params), "--model", str(tok_model["model"]), "--mix", "Q8_0",
                "--mix", "auto", "--no-validate", "--workdir", str(cluster.workdir)], env, tmp_path)
    assert sub.returncode == 0, sub.stderr
    job = sub.stdout.strip()
    assert len(job) == 32 and job.isalnum(), sub.stdout

    watch = _cli(["status", job, "--watch", "--interval", "0.3"], env, tmp_path)
    assert watch.returncode == 0, watch.stdout + watch.stderr
    assert f"job {job}: SUCCESS 100.0% (3/3 tasks) done" in watch.stdout
    assert job[:12] in watch.stderr and "100%" in watch.stderr     # the progress bar, on stderr
    for row in ("profile", "Q8_0:quantize", "auto:quantize"):
        assert row in watch.stdout

    st = json.loads(_cli(["status", job, "--json"], env, tmp_path).stdout)
    auto = next(r for r in st["result"]["results"] if r["mix"] == "auto")["artifact"]
    assert auto["recipe"]["precision"] == "AUTO" and auto["auto"]["target"] == "Q4_K_M"
    prof = Path(auto["auto"]["profile"])
    assert prof.is_file() and prof.parent == cluster.workdir
    # budget = Q4_K_M's tensor data on this model: the auto file holds no more
    assert sum(auto["tensor_bytes"].values()) <= mix_sizes(tok_model["model"])["Q4_K_M"]
    assert len(set(auto["tensor_types"].values())) > 1     # per-tensor choices, not one type

    again = _cli(["submit", "--params", str(params), "--model", str(tok_model["model"]), "--mix", "AUTO",
                  "--no-validate", "--workdir", str(cluster.workdir)], env, tmp_path)
    assert _cli(["status", again.stdout.strip(), "--watch", "--interval", "0.3"], env, tmp_path).returncode == 0
    st2 = json.loads(_cli(["status", again.stdout.strip(), "--json"], env, tmp_path).stdout)
    (res2,) = st2["result"]["results"]
    assert res2["artifact"]["reused"] is True and res2["artifact"]["sha256"] == auto["sha256"]


def test_cli_status_of_unknown_job_is_one_line_error(cluster, tmp_path):
    import os

    env = {**os.environ, "QUANTGATE_BROKER_URL": cluster.redis.url, "PYTHONPATH": str(ROOT)}
    r = _cli(["status", "no-such-job"], env, tmp_path, timeout=60)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "unknown job 'no-such-job'" in lines[0], r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
