"""The MLflow tracking server is down while a job needs it: the task that reads the registry (the `resolve` task of a
job on a models:/ reference, the `register` task) retries with backoff and the job succeeds once a real `mlflow
server` is up; a reference the registry does not hold still fails at once, never retried. A real worker, a real
Redis broker, a real `mlflow server` started after the job was queued (then stopped and restarted); no mocks."""
from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from core.errors import QuantGateError
from quantgate import jobs
from tests._mlflow_models import REFERENCE, log_version
from tests._mlflow_server import MlflowServer
from tests.tasks.conftest import QUANTGATE, ROOT, free_port, wait_for

#: the worker retries often and briefly (the defaults, 5 retries up to 300 s apart, would outlast the test's patience
#: with a jittered backoff that may sum to seconds); MLflow's own HTTP retries kept short so each attempt is quick
WORKER_ENV = {"QUANTGATE_MAX_RETRIES": "100", "QUANTGATE_RETRY_BACKOFF_MAX": "3",
              "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def _cli(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(QUANTGATE + args, env=env, cwd=cwd, capture_output=True, text=True, timeout=180)


def _retried(log: str, task: str) -> bool:
    return any(f"{task}[" in ln and "retry: Retry in" in ln and "unreachable" in ln for ln in log.splitlines())


def test_registry_down_then_up_job_retries_and_succeeds(cluster, models, tmp_path):
    from mlflow import MlflowClient

    from tasks import tasks as T

    store = tmp_path / "mlflow"
    store.mkdir()
    db = store / "mlflow.db"
    v1 = log_version(f"sqlite:///{db}", store, "base", REFERENCE)        # the registry's content, server down
    MlflowClient(f"sqlite:///{db}", f"sqlite:///{db}").set_registered_model_alias("base", "champion", v1)
    server = MlflowServer(free_port(), db, store)
    w = cluster.worker("w1", QUANTGATE_MLFLOW_URI=server.url, **WORKER_ENV)
    try:
        # submitted from params.yaml's model (no --model): sent as a reference, resolved by the worker
        params = tmp_path / "params.yaml"
        params.write_text(json.dumps({"model": {"path": "models:/base@champion", "name": "base-q"},
                                      "mixes": ["Q8_0"]}))
        env = {**os.environ, "QUANTGATE_BROKER_URL": cluster.redis.url, "PYTHONPATH": str(ROOT),
               "QUANTGATE_STORE_DIR": str(tmp_path / "submitter-store"),
               "QUANTGATE_CACHE_DIR": str(tmp_path / "submitter-cache")}
        sub = _cli(["submit", "--params", str(params), "--register", "--workdir", str(cluster.workdir)], env, tmp_path)
        assert sub.returncode == 0, sub.stderr
        job = sub.stdout.strip()
        wait_for(lambda: _retried(w.log(), "quantgate.resolve"), 60, "the resolve task to retry", interval=0.3)
        st = T.job_status(job)
        assert st["state"] not in ("SUCCESS", "FAILURE") and "unreachable" in st["tasks"]["source"].get("error", "")

        server.start()                                                    # the registry comes back
        wait_for(lambda: T.job_status(job)["state"] in ("SUCCESS", "FAILURE"), 240, "the job to end", interval=0.5)
        st = T.job_status(job)
        assert st["state"] == "SUCCESS", (st, w.log()[-3000:])
        assert st["tasks"]["source"]["retries"] >= 1
        res = st["result"]
        assert res["model"] == f"models:/base/{v1}" and res["source"]["lineage"]["alias"] == "champion"
        (rec,) = res["results"]
        assert rec["version"]["model_name"] == "base-q"
        mv = MlflowClient(server.url, server.url).get_model_version("base-q", rec["version"]["version"])
        assert mv.tags["source"] == f"models:/base/{v1}"

        # a reference the registry does not hold, server up: FAILURE at once, no retry
        bad = _cli(["submit", "--params", str(params), "--model", "models:/base/99", "--workdir",
                    str(cluster.workdir)], env, tmp_path)
        assert bad.returncode == 0, bad.stderr
        wait_for(lambda: T.job_status(bad.stdout.strip())["state"] == "FAILURE", 60, "the bad job to fail")
        src = T.job_status(bad.stdout.strip())["tasks"]["source"]
        assert src["retries"] == 0 and "no version 99" in src["error"]

        # the registry goes down again before a job's register task: that task retries, then registers once
        server.stop()
        spec = jobs.JobSpec(model=str(models["tiny"]), mixes=("Q8_0",), workdir=str(cluster.workdir), register=True,
                            model_name="tiny-q")
        job2 = T.submit(spec)
        wait_for(lambda: _retried(w.log(), "quantgate.register"), 120, "the register task to retry", interval=0.3)
        server.start()
        wait_for(lambda: T.job_status(job2)["state"] in ("SUCCESS", "FAILURE"), 240, "job 2 to end", interval=0.5)
        st2 = T.job_status(job2)
        assert st2["state"] == "SUCCESS", (st2, w.log()[-3000:])
        assert st2["tasks"]["Q8_0:register"]["retries"] >= 1
        versions = MlflowClient(server.url, server.url).search_model_versions("name = 'tiny-q'")
        assert len(versions) == 1                                         # registered exactly once
        assert w.alive()
    finally:
        server.stop()


def test_unreachable_registry_is_transient_a_bad_reference_is_not(tmp_path):
    from quantgate.inputs import ModelSourceUnreachable, resolve_model
    from registry.config import RegistrySettings
    from tasks.tasks import TransientError, is_transient, transient_guard

    port = free_port()                                                     # nothing listens there
    settings = RegistrySettings.from_env({"QUANTGATE_MLFLOW_URI": f"http://127.0.0.1:{port}",
                                          "QUANTGATE_STORE_DIR": str(tmp_path / "store")})
    with pytest.raises(ModelSourceUnreachable, match="unreachable"):  # not "has no alias"
        resolve_model("models:/base@champion", settings=settings)
    with pytest.raises(ModelSourceUnreachable) as down:   # not "no version 1"
        resolve_model("models:/base/1", settings=settings)
    assert isinstance(down.value, QuantGateError) and "unreachable" in str(down.value) and is_transient(down.value)
    with pytest.raises(TransientError, match="unreachable"):
        with transient_guard():
            raise down.value
    bad = jobs.JobPathError("model /etc lies outside the model roots")
    assert not is_transient(bad)


def test_a_registry_that_never_answers_is_transient(tmp_path, monkeypatch):
    """A server that accepts connections and never answers: a timeout (MLFLOW_HTTP_REQUEST_TIMEOUT, 2 s here)."""
    from quantgate.inputs import ModelSourceUnreachable, resolve_model
    from registry.config import RegistrySettings
    from tasks.tasks import is_transient

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)                                                    # the kernel accepts; nobody answers
        settings = RegistrySettings.from_env({"QUANTGATE_MLFLOW_URI": f"http://127.0.0.1:{srv.getsockname()[1]}",
                                              "QUANTGATE_STORE_DIR": str(tmp_path / "store")})
        with pytest.raises(ModelSourceUnreachable, match="timed out") as down:
            resolve_model("models:/base@champion", settings=settings)
    assert is_transient(down.value)
