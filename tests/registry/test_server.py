"""One integration test through a real `mlflow server` (loopback, random free port, --workers 1, artifacts proxied
through the server): register a passing and a failing GGUF, promote/refuse, download, load the pyfunc model."""
from __future__ import annotations

import os
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


@pytest.fixture
def mlflow_server(tmp_path):
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


def test_register_promote_download_through_mlflow_server(mlflow_server, tiny_artifacts, tmp_path):
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
    assert list((tmp_path / "server-artifacts").rglob("*.gguf"))  # stored by the server, not the client
    m = mlflow.pyfunc.load_model("models:/served@production")
    assert Path(m.unwrap_python_model().gguf_path).read_bytes()[:4] == b"GGUF"
    with AuditLog(s.audit_db_url) as log:
        assert [e.action for e in log.events(model="served")] == ["register", "register", "promote", "refuse",
                                                                   "download"]
        assert log.verify().ok
