"""One integration test through a real `mlflow server` (loopback, random free port, --workers 1, artifacts proxied
through the server): register a passing and a failing GGUF, promote/refuse, download, load the pyfunc model."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.registry.conftest import make_verdict, validated


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server_root(tmp_path_factory) -> Path:
    """The server's own folder (backend DB, artifacts, log), shared by this module's tests."""
    return tmp_path_factory.mktemp("mlflow-server")


@pytest.fixture(scope="module")
def mlflow_server(mlflow_server_root):
    """One `mlflow server` for the module's tests (each uses its own model name): one ~18 s start, not two."""
    tmp_path = mlflow_server_root
    port = _free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen(
        [str(mlflow_bin), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", (tmp_path / "server-artifacts").as_uri()],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(tmp_path / 'server.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after 120 s: {(tmp_path / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_register_promote_download_through_mlflow_server(mlflow_server, mlflow_server_root, tiny_artifacts,
                                                         tmp_path):
    import mlflow

    from registry.audit import AuditLog
    from registry.client import PromotionRefused
    from registry.config import RegistrySettings
    from registry.queries import download
    from registry.registration import promote, register_gguf

    _, _, q4, q8 = tiny_artifacts
    s = RegistrySettings.from_env(env={"QUANTGATE_MLFLOW_URI": mlflow_server, "QUANTGATE_STORE_DIR": str(tmp_path)})
    assert s.artifact_location is None and s.audit_db_url.startswith("sqlite:///")
    for art, passed in ((q4, True), (q8, False)):
        validated(make_verdict(art, passed), s.audit_db_url)
    ok = register_gguf(q4.path, settings=s, verdict=make_verdict(q4, True), artifact=q4, model_name="served")
    bad = register_gguf(q8.path, settings=s, verdict=make_verdict(q8, False), artifact=q8, model_name="served")
    again = register_gguf(q4.path, settings=s, verdict=make_verdict(q4, True), artifact=q4, model_name="served")
    assert (ok.version, bad.version, again.version, again.created) == ("1", "2", "1", False)
    promote("served", ok.version, "production", settings=s)
    with pytest.raises(PromotionRefused):
        promote("served", bad.version, "production", settings=s)
    got = download("served@production", tmp_path / "dl", settings=s)
    assert got.read_bytes() == Path(q4.path).read_bytes()
    assert list((mlflow_server_root / "server-artifacts").rglob("*.gguf"))  # stored by the server, not the client
    m = mlflow.pyfunc.load_model("models:/served@production")
    assert Path(m.unwrap_python_model().gguf_path).read_bytes()[:4] == b"GGUF"
    with AuditLog(s.audit_db_url) as log:
        assert [e.action for e in log.events(model="served")] == ["register", "register", "promote", "refuse",
                                                                   "download"]
        assert log.verify().ok


def test_version_views_through_mlflow_server(mlflow_server, tmp_path, monkeypatch):
    """What people see in MLflow for a version made by the job steps (CLI `run`, DVC `stage register`, Celery):
    trimmed tags with file_type by name, a Markdown description whose figures match the run and whose report
    links the server serves, the validation reports + compliance report in the run, quality metrics only."""
    import json
    import urllib.parse

    from mlflow import MlflowClient

    from quantgate.jobs import quantize_step, register_step, validate_step
    from registry.facts import QUALITY_METRICS
    from registry.views import FILTER_TAGS, MACHINE_TAGS

    repo = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("QUANTGATE_MLFLOW_URI", mlflow_server)
    monkeypatch.setenv("QUANTGATE_STORE_DIR", str(tmp_path / "store"))
    monkeypatch.setenv("QUANTGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("QUANTGATE_AUDIT_DB_URL", raising=False)
    rows = (repo / "data" / "eval.jsonl").read_text().splitlines()
    (tmp_path / "eval.jsonl").write_text("\n".join(rows[::12]) + "\n")  # 9 samples over the three categories
    art = quantize_step(repo / "models" / "reference", "Q4_K_M", workdir=tmp_path / "jobs")
    v = validate_step(art, baseline=repo / "models" / "reference", gates=["kl_mean <= 0.5", "ppl_ratio <= 1.5"],
                      dataset=str(tmp_path / "eval.jsonl"), options={"max_tokens": 48})
    assert v["passed"], v
    rv = register_step(art, v, model_name="viewed")
    c = MlflowClient(mlflow_server, mlflow_server)
    mv = c.get_model_version("viewed", rv["version"])
    assert set(mv.tags) <= set(FILTER_TAGS) | set(MACHINE_TAGS)
    assert mv.tags["file_type"] == "MOSTLY_Q4_K_M" and mv.tags["precision"] == "Q4_K_M"
    assert mv.tags["verdict"] == "passed" and mv.tags["source"] == "reference"
    run = c.get_run(mv.run_id)
    m = run.data.metrics
    files = {a.path for a in c.list_artifacts(mv.run_id, "reports/validation_html")} | \
        {a.path for d in ("reports/validation_md", "reports/validation_json", "reports/junit", "compliance")
         for a in c.list_artifacts(mv.run_id, d)}
    assert files == {"reports/validation_html/validation.html", "reports/validation_md/validation.md",
                     "reports/validation_json/validation.json", "reports/junit/junit.xml",
                     f"compliance/viewed-v{rv['version']}-compliance.html"}
    # metrics: quality figures overall and per category, sizes, gates on metrics, timings; no expectation counters
    allowed = set(QUALITY_METRICS) | {"file_size_bytes", "bits_per_weight", "n_params", "gates_failed"}
    for k in m:
        base = k.split(".", 2)[-1] if k.startswith("val.") else k
        assert base in allowed or k.startswith(("gate.kl_mean", "gate.ppl_ratio", "timing.")), k
    assert {"val.code.kl_mean", "val.chat.kl_mean", "val.math.kl_mean"} <= set(m) and len(m) < 60
    # the description: mix, file type, size, bpw, KLD ± SE, PPL ratio, verdict, gate set, links the server serves
    d = mv.description
    n_ok = sum(1 for g in v["gates"] if g["passed"] and not g.get("skipped"))
    for text in ("**Q4\\_K\\_M**", "` MOSTLY_Q4_K_M `", f"{m['bits_per_weight']:.3f} bpw", "verdict **passed**",
                 f"{n_ok}/{len(v['gates'])} gates passed", f"{m['kl_mean']:.5f} ± {m['kl_mean_se']:.5f}",
                 f"{m['ppl_ratio']:.5f}"):
        assert text in d, (text, d)
    links = dict(re.findall(r"\[([^\]]+)\]\((get-artifact\?[^)]+)\)", d))
    assert len(links) == 5, d
    for label, href in links.items():
        with urllib.request.urlopen(f"{mlflow_server}/{href}", timeout=30) as r:
            body = r.read()
        path = urllib.parse.parse_qs(urllib.parse.urlparse(href).query)["path"][0]
        assert r.status == 200 and body, label
        if path.endswith(".json"):
            assert json.loads(body)["overall"]["kl_mean"] == pytest.approx(m["kl_mean"])
        if path.endswith(".html"):
            assert b"<html" in body.lower()[:500]
