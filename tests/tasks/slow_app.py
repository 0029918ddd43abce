"""`celery -A tests.tasks.slow_app worker`: quantgate's app (all its tasks and settings) plus one test task that
runs as long as it is told on the real QuantgateTask base, and logs each run's start and end to a file."""
from __future__ import annotations

import os
import time

from tasks.app import app
from tasks.tasks import QuantgateTask


@app.task(bind=True, base=QuantgateTask, name="qgtest.slow")
def slow(self: QuantgateTask, seconds: float, runlog: str) -> dict:
    """Sleep `seconds` (in small steps, like a long job), appending `start|end <task id> <node> <pid> <time>`."""
    def mark(what: str) -> None:
        with open(runlog, "a", encoding="utf-8") as f:
            f.write(f"{what} {self.request.id} {self.request.hostname} {os.getpid()} {time.time():.3f}\n")

    mark("start")
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        time.sleep(0.1)
    mark("end")
    return {"slept": seconds, "node": self.request.hostname}
