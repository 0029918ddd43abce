"""Issue 12 section 8: a worker that dies whole (kill -9 of the main process and its pool, as when a machine is
lost) has its job finished once by another worker within 2 minutes, with DEFAULT settings, on both supported
brokers; and a task that is still running on a live worker is never handed to a second one (quantgate.lease)."""
from __future__ import annotations

import threading
import time

import psutil
import pytest

from quantgate import jobs
from quantgate.config import Settings
from tests.tasks import conftest as _fx
from tests.tasks.conftest import wait_for
from tests.tasks.test_crash_recovery import _check_single_artifact, _wait_quantizing, _watch_dir

# The real Redis / RabbitMQ / worker fixtures of the task tests.
redis_server, cluster, rabbit_vhost, rabbit_cluster, models = (
    _fx.redis_server, _fx.cluster, _fx.rabbit_vhost, _fx.rabbit_cluster, _fx.models)

RECOVERY_LIMIT_S = 120
# Test-picked timeouts for the long-task test: the task outlives the visibility timeout 3x and the lease TTL 5x.
SHORT = {"QUANTGATE_VISIBILITY_TIMEOUT": "6", "QUANTGATE_LEASE_TTL": "4", "QUANTGATE_LEASE_RENEW_INTERVAL": "1"}


@pytest.fixture(params=["redis", "rabbitmq"])
def any_cluster(request):
    return request.getfixturevalue("cluster" if request.param == "redis" else "rabbit_cluster")


def test_defaults_are_the_documented_ones():
    s = Settings()
    assert (s.visibility_timeout, s.lease_ttl, s.lease_renew_interval) == (60, 30, 10)


def test_kill9_whole_worker_job_finishes_once_on_another_worker(any_cluster, models):
    """Default settings: kill -9 the worker's process group mid-quantization; a second worker finishes the job."""
    from tasks import tasks as T

    c = any_cluster
    w1 = c.worker("w1")
    spec = jobs.JobSpec(model=str(models["mid"]), mixes=("Q3_K_M",), workdir=str(c.workdir))
    stop, seen = threading.Event(), {}
    c.workdir.mkdir(parents=True, exist_ok=True)
    watcher = threading.Thread(target=_watch_dir, args=(c.workdir, stop, seen), daemon=True)
    watcher.start()
    job = T.submit(spec)
    _wait_quantizing(T, job, "Q3_K_M")
    procs = [psutil.Process(w1.pid)] + w1.children()
    assert len(procs) >= 2, "expected the main process and its pool"
    w1.kill9()                                      # SIGKILL to the whole process group: main and pool at once
    wait_for(lambda: not any(p.is_running() and p.status() != "zombie" for p in procs), 10, "the worker to die")
    t_kill = time.monotonic()
    w2 = c.worker("w2")
    wait_for(lambda: T.job_status(job)["state"] in ("SUCCESS", "FAILURE"), RECOVERY_LIMIT_S,
             "the job to end on w2", interval=0.5)
    recovered = time.monotonic() - t_kill
    stop.set()
    watcher.join()
    st = T.job_status(job)
    assert st["state"] == "SUCCESS", st
    assert recovered < RECOVERY_LIMIT_S
    assert w2.log().count("Task quantgate.quantize[") >= 1
    _check_single_artifact(c.workdir, st["result"], seen)
    print(f"\n[{c.broker.split(':')[0]}] whole-worker kill -9 -> job finished on w2 after {recovered:.1f} s")


def test_long_task_on_live_worker_is_not_redelivered(any_cluster, tmp_path):
    """A task running 3x the visibility timeout (5x the lease TTL) stays with its live worker: an idle second
    worker never receives it, and it runs exactly once."""
    from tests.tasks import slow_app

    c = any_cluster
    runlog = tmp_path / "runs.log"
    w1 = c.worker("w1", celery_app="tests.tasks.slow_app", **SHORT)
    res = slow_app.slow.apply_async((20.0, str(runlog)))
    wait_for(lambda: runlog.exists() and "start" in runlog.read_text(), 30, "the long task to start")
    w2 = c.worker("w2", celery_app="tests.tasks.slow_app", **SHORT)
    out = res.get(timeout=60)
    assert out["slept"] == 20.0 and out["node"].startswith("w1@"), out
    runs = runlog.read_text().splitlines()
    assert [ln.split()[0] for ln in runs] == ["start", "end"], runs
    assert "qgtest.slow[" not in w2.log(), "the running task was redelivered to the idle worker"
    assert w1.log().count("Task qgtest.slow[") >= 1


def test_copy_of_a_task_whose_lease_is_alive_waits_then_runs(cluster, tmp_path):
    """The task-start guard: a delivery whose lease another (live) worker holds waits until the lease is gone; if
    that owner finished meanwhile, the stored result is returned and the body never runs twice."""
    import redis

    from quantgate.lease import LEASE_PREFIX
    from tests.tasks import slow_app

    r = redis.Redis.from_url(cluster.redis.url)
    runlog = tmp_path / "runs.log"
    w1 = cluster.worker("w1", celery_app="tests.tasks.slow_app")
    # 1. the owner "died" holding the lease: the copy waits for the TTL, then runs.
    r.set(LEASE_PREFIX + "guard-1", "ghost@elsewhere", px=5000)
    t_plant = time.time()
    res = slow_app.slow.apply_async((0.2, str(runlog)), task_id="guard-1")
    assert res.get(timeout=30)["node"].startswith("w1@")
    (start,) = [ln.split() for ln in runlog.read_text().splitlines() if ln.startswith("start")]
    assert float(start[4]) >= t_plant + 4.5, "ran while another worker's lease was alive"
    assert "guard-1 is running on ghost@elsewhere" in w1.log()
    # 2. the owner finished while the copy waited: its stored result comes back, the body does not run again.
    r.set(LEASE_PREFIX + "guard-2", "ghost@elsewhere", px=3000)
    res2 = slow_app.slow.apply_async((0.2, str(runlog)), task_id="guard-2")
    time.sleep(1.0)
    slow_app.app.backend.store_result("guard-2", {"slept": -1, "node": "ghost@elsewhere"}, "SUCCESS")
    wait_for(lambda: "guard-2 already finished on another worker" in w1.log(), 30, "the copy to see the result")
    assert res2.get(timeout=30) == {"slept": -1, "node": "ghost@elsewhere"}
    wait_for(lambda: "Task qgtest.slow[guard-2] succeeded" in w1.log(), 10, "the copy to be acked")
    assert "guard-2" not in runlog.read_text()
    assert not r.exists(LEASE_PREFIX + "guard-1") and not r.exists(LEASE_PREFIX + "guard-2")
