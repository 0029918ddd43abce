"""20 jobs on 2 workers (same results as in-process, no duplicates) and bad input failing fast, never retried."""
from __future__ import annotations

import json
import time
from pathlib import Path

from quantgate import jobs
from tests.tasks.conftest import wait_for

MIXES = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_S")


def _ended(T, job_ids):
    return all(T.job_status(j)["state"] in ("SUCCESS", "FAILURE") for j in job_ids)


def test_twenty_jobs_on_two_workers_match_in_process_run(cluster, models, tmp_path):
    from tasks import tasks as T

    cluster.worker("w1")
    cluster.worker("w2")
    # model x mix x repeat: the second copy of each (model, mix) has the same job key and must reuse, not redo
    specs = [jobs.JobSpec(model=str(models[m]), mixes=(mix,), workdir=str(cluster.workdir))
             for _ in range(2) for m in ("tiny", "tiny2") for mix in MIXES]
    assert len(specs) == 20
    t0 = time.time()
    sent = {T.submit(s): (s, time.time()) for s in specs}
    wait_for(lambda: _ended(T, sent), 180, "20 jobs to end", interval=0.5)
    wall = time.time() - t0
    statuses = {j: T.job_status(j) for j in sent}
    assert all(st["state"] == "SUCCESS" for st in statuses.values()), [st["errors"] for st in statuses.values()]
    rows = sorted(jobs.summarize(st["result"]["results"])[0]["sha256"] for st in statuses.values())
    # identical to the in-process run (separate workdir, so it really recomputes)
    local = []
    for s in specs[:10]:
        r = jobs.run_job(jobs.JobSpec(model=s.model, mixes=s.mixes, workdir=str(tmp_path / "local")))
        local += [x["sha256"] for x in jobs.summarize(r["results"])]
    assert rows == sorted(local * 2)
    # no duplicates: one folder, one GGUF per job key, no temp files
    ggufs = list(cluster.workdir.rglob("*.gguf"))
    assert len(ggufs) == 10 and len({p.parent for p in ggufs}) == 10
    assert not list(cluster.workdir.rglob("*.tmp"))
    reused = sum(st["result"]["results"][0]["artifact"]["reused"] for st in statuses.values())
    assert reused == 10
    from datetime import datetime

    lat = sorted(datetime.fromisoformat(st["date_done"]).timestamp() - sent[j][1] for j, st in statuses.items())
    print(json.dumps({"jobs": 20, "wall_s": round(wall, 2), "jobs_per_s": round(20 / wall, 2),
                      "latency_p50_s": round(lat[10], 2), "latency_max_s": round(lat[-1], 2)}))


def test_bad_input_fails_fast_without_retry_and_worker_survives(cluster, models):
    from tasks import tasks as T

    w = cluster.worker("w1")
    bad = {
        "corrupt": jobs.JobSpec(model=str(models["corrupt"]), mixes=("Q4_K_M",), workdir=str(cluster.workdir)),
        "missing": jobs.JobSpec(model=str(models["missing"]), mixes=("Q4_K_M",), workdir=str(cluster.workdir)),
        "mix": jobs.JobSpec(model=str(models["tiny"]), mixes=("Q9_Z",), workdir=str(cluster.workdir)),
    }
    ids = {k: T.submit(s) for k, s in bad.items()}
    wait_for(lambda: _ended(T, ids.values()), 60, "bad jobs to fail")
    expect = {"corrupt": "truncated", "mix": "unknown precision 'Q9_Z'",
              "missing": "no such file or folder on this worker; a plain path is read where the worker runs"}
    for k, j in ids.items():
        st = T.job_status(j)
        assert st["state"] == "FAILURE", st
        (task,) = st["tasks"].values()
        assert task["retries"] == 0
        assert any(e in task["error"] for e in ("CheckpointError", "UnsupportedTypeError", "JobPathError"))
        assert expect[k] in task["error"], task["error"]
    assert "Retry in" not in w.log()
    good = T.submit(jobs.JobSpec(model=str(models["tiny"]), mixes=("Q8_0",), workdir=str(cluster.workdir)))
    wait_for(lambda: _ended(T, [good]), 60, "a good job after the bad ones")
    assert T.job_status(good)["state"] == "SUCCESS"
    assert w.alive()
    assert not list(Path(cluster.workdir).rglob("*.gguf"))[1:]  # only the good job wrote a file


def test_transient_errors_are_classified_carefully():
    import redis.exceptions

    from core.errors import CheckpointError
    from tasks.tasks import is_transient

    assert is_transient(ConnectionRefusedError(111, "refused"))
    assert is_transient(redis.exceptions.ConnectionError("down"))
    wrapped = RuntimeError("mlflow said no")
    wrapped.__cause__ = TimeoutError("read timed out")
    assert is_transient(wrapped)
    assert not is_transient(FileNotFoundError(2, "gone"))     # an OSError, but bad input
    assert not is_transient(PermissionError(13, "denied"))
    assert not is_transient(CheckpointError("corrupt"))
    assert not is_transient(ValueError("bug"))
