"""kill -9 during a quantization: the job still finishes exactly once, and no partial GGUF is ever visible."""
from __future__ import annotations

import threading
import time
from pathlib import Path

from quantgate import jobs
from tests.tasks.conftest import wait_for


def _watch_dir(folder: Path, stop: threading.Event, seen: dict[str, set[int]]) -> None:
    """Record the size of every visible (not dot-hidden) GGUF in the job folders, ~every 20 ms."""
    while not stop.is_set():
        for p in folder.glob("*/*.gguf"):
            try:
                seen.setdefault(p.name, set()).add(p.stat().st_size)
            except FileNotFoundError:
                pass
        time.sleep(0.02)


def _wait_quantizing(tasks_mod, job_id: str, mix: str, min_percent: float = 5.0) -> None:
    def running() -> bool:
        st = tasks_mod.job_status(job_id)["tasks"][f"{mix}:quantize"]
        return st["state"] == "PROGRESS" and st.get("percent", 0) >= min_percent
    wait_for(running, 60, "the quantization to be under way", interval=0.05)


def _check_single_artifact(workdir: Path, result: dict, seen: dict[str, set[int]]) -> None:
    (rec,) = result["results"]
    art = rec["artifact"]
    folder = Path(art["path"]).parent
    assert folder.parent == workdir
    assert sorted(p.name for p in folder.iterdir()) == sorted([Path(art["path"]).name, jobs.ARTIFACT_JSON])
    assert [p for p in workdir.rglob("*.tmp")] == []   # the dead writer's temp file was cleaned up
    assert seen.get(Path(art["path"]).name) == {art["nbytes"]}  # only ever seen whole
    assert len(list(workdir.rglob("*.gguf"))) == 1


def test_kill9_pool_child_mid_quantize_requeues_and_finishes_once(cluster, models):
    from tasks import tasks as T

    w = cluster.worker("w1")
    spec = jobs.JobSpec(model=str(models["mid"]), mixes=("Q4_K_M",), workdir=str(cluster.workdir))
    stop, seen = threading.Event(), {}
    cluster.workdir.mkdir(parents=True, exist_ok=True)
    watcher = threading.Thread(target=_watch_dir, args=(cluster.workdir, stop, seen), daemon=True)
    watcher.start()
    job = T.submit(spec)
    _wait_quantizing(T, job, "Q4_K_M")
    (child,) = w.children()
    child.kill()                                   # SIGKILL the pool process doing the quantization
    assert list(cluster.workdir.rglob("*.tmp")), "the killed writer should have left its temp file"
    wait_for(lambda: T.job_status(job)["state"] in ("SUCCESS", "FAILURE"), 120, "the job to end")
    stop.set()
    watcher.join()
    st = T.job_status(job)
    assert st["state"] == "SUCCESS", st
    assert w.alive()
    assert "WorkerLostError" in w.log() or "Process" in w.log()
    _check_single_artifact(cluster.workdir, st["result"], seen)
    # The same job again finds the finished artifact instead of making another.
    again = T.submit(spec)
    wait_for(lambda: T.job_status(again)["state"] == "SUCCESS", 60, "the rerun")
    assert T.job_status(again)["result"]["results"][0]["artifact"]["reused"] is True
    assert len(list(cluster.workdir.rglob("*.gguf"))) == 1


# kill -9 of the WHOLE worker (main process and pool), with default settings and on both brokers:
# tests/security/test_dead_worker.py
