"""Redis stops during a run and comes back: the client gets a clear error or the job completes; nothing is made
twice or half, and the worker carries on with new jobs."""
from __future__ import annotations

import time

import pytest

from core.errors import QuantGateError
from quantgate import jobs
from tests.tasks.conftest import wait_for


def test_redis_restart_mid_job_no_duplicate_no_partial(cluster, models):
    from tasks import tasks as T

    w = cluster.worker("w1")
    spec = jobs.JobSpec(model=str(models["mid"]), mixes=("Q5_K_M",), workdir=str(cluster.workdir))
    job = T.submit(spec)
    wait_for(lambda: T.job_status(job)["tasks"]["Q5_K_M:quantize"]["state"] == "PROGRESS", 60, "quantize start",
             interval=0.05)
    cluster.redis.stop()
    with pytest.raises(Exception) as down:          # the client sees the outage as a connection error
        T.job_status(job)
    assert T.is_transient(down.value)
    time.sleep(2)
    cluster.redis.start()                           # --save '': the restarted Redis has lost every key
    # the running quantization was not disturbed (progress reports are best effort) and its file lands whole
    wait_for(lambda: list(cluster.workdir.rglob("artifact.json")), 90, "the artifact", interval=0.2)
    with pytest.raises(QuantGateError, match="unknown job"):
        T.job_status(job)                           # clear error: the job's state went with Redis
    assert len(list(cluster.workdir.rglob("*.gguf"))) == 1
    assert not list(cluster.workdir.rglob("*.tmp"))
    assert w.alive()
    # resubmitting the same job finishes at once from the finished artifact: nothing is made twice
    again = T.submit(spec)
    wait_for(lambda: T.job_status(again)["state"] in ("SUCCESS", "FAILURE"), 120, "the resubmitted job")
    st = T.job_status(again)
    assert st["state"] == "SUCCESS", st
    assert st["result"]["results"][0]["artifact"]["reused"] is True
    assert len(list(cluster.workdir.rglob("*.gguf"))) == 1
