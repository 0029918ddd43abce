"""Task leases: telling a worker that died whole from one that is still working (docs/SCALING.md, "Dead workers").

Two pieces, both driven by the worker's MAIN process (an event loop that task code never blocks, unlike a thread
in a pool child that a long GIL-holding kernel could starve):

- `LeaseKeeper` (a consumer bootstep) runs every `lease_renew_interval` seconds and
  * on a Redis broker, moves the `unacked_index` score of every message this worker holds (running, waiting for a
    pool slot, or an ETA retry) to "now": kombu restores an unacked message to the queue only when its score is
    older than the visibility timeout, so a message stays invisible exactly as long as its worker is alive, and a
    worker killed whole (main process and pool) has its messages back after one visibility timeout;
  * renews the lease key `quantgate-lease-<task id>` (value: the worker's node name, TTL `lease_ttl`) of each task
    this worker is running, and deletes the leases of tasks that left it (finished, or their pool child died).
- `TaskLease` (used by tasks.tasks.QuantgateTask in the pool child) takes the lease before the task body runs. A
  delivery whose lease is held by another worker (that worker is alive: the copy came from a network partition,
  a broker restart or RabbitMQ's consumer_timeout) waits until the lease is gone, then returns the stored result
  when the owner finished, else runs (the owner died; every task is idempotent).

Leases live in the result backend's Redis (which is also the broker's when the broker is Redis). Without a Redis
result backend (eager mode, tests with cache backends) there are no leases and tasks run as before.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any

_log = logging.getLogger(__name__)

LEASE_PREFIX = "quantgate-lease-"
#: Renew the key's TTL only if we still own it; delete it only if we own it (compare-and-set, atomic in Redis).
_RENEW = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"
_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def is_redis(url: str | None) -> bool:
    return bool(url) and url.strip().lower().startswith(_REDIS_SCHEMES)


def timings(conf: Any) -> tuple[float, float, float]:
    """(renew interval, lease TTL, visibility timeout) in seconds from the app's quantgate settings; the interval is
    clamped to a third of the TTL and of the visibility timeout so one late tick never loses a live task."""
    s = conf.get("quantgate_settings") or {}
    vt = float(s.get("visibility_timeout") or 60)
    ttl = float(s.get("lease_ttl") or 30)
    every = float(s.get("lease_renew_interval") or 10)
    return max(0.2, min(every, ttl / 3, vt / 3)), ttl, vt


_clients: dict[str, tuple[int, Any]] = {}


def redis_client(url: str) -> Any:
    """One redis client per URL and process (a client made before a fork is not reused in the child)."""
    pid = os.getpid()
    hit = _clients.get(url)
    if hit is None or hit[0] != pid:
        import redis

        hit = (pid, redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5))
        _clients[url] = hit
    return hit[1]


def lease_url(conf: Any) -> str | None:
    """The Redis URL leases live in (the result backend's), or None when tasks run without leases."""
    if conf.get("task_always_eager"):
        return None
    url = conf.get("result_backend")
    return url if isinstance(url, str) and is_redis(url) else None


class TaskLease:
    """The pool child's side: take the lease of one task before its body runs, give it back afterwards."""

    def __init__(self, client: Any, task_id: str, owner: str, ttl: float, poll: float = 1.0):
        self.client, self.key, self.owner = client, LEASE_PREFIX + task_id, owner
        self.ttl_ms, self.poll = int(ttl * 1000), poll

    @classmethod
    def for_task(cls, task: Any) -> "TaskLease | None":
        req = task.request
        url = lease_url(task.app.conf)
        if url is None or not req.id or getattr(req, "is_eager", False) or getattr(req, "called_directly", False):
            return None
        _, ttl, _ = timings(task.app.conf)
        return cls(redis_client(url), req.id, req.hostname or f"pid-{os.getpid()}", ttl)

    def acquire(self) -> float:
        """Take the lease, waiting while another live worker holds it; returns the seconds waited (0: none).

        Redis unreachable: runs without a lease (logged); the task is idempotent and the job-key lock still
        serialises the work."""
        t0 = time.monotonic()
        logged = False
        while True:
            waited = time.monotonic() - t0 if logged else 0.0
            try:
                if self.client.set(self.key, self.owner, nx=True, px=self.ttl_ms):
                    return waited
                holder = self.client.get(self.key)
                if holder is not None and holder.decode(errors="replace") == self.owner:
                    self.client.pexpire(self.key, self.ttl_ms)   # ours (a requeue after our own pool child died)
                    return waited
            except Exception as e:  # noqa: BLE001 - see the docstring
                _log.warning("lease %s unavailable (%s: %s): running without it", self.key, type(e).__name__, e)
                return waited
            if not logged:
                _log.warning("%s is running on %s (its lease is alive): waiting for it to finish or die",
                             self.key[len(LEASE_PREFIX):], holder.decode(errors="replace") if holder else "?")
                logged = True
            time.sleep(self.poll)

    def release(self) -> None:
        try:
            self.client.eval(_RELEASE, 1, self.key, self.owner)
        except Exception as e:  # noqa: BLE001 - the lease expires by itself; never fail a finished task over it
            _log.warning("could not release %s (%s: %s); it expires by itself", self.key, type(e).__name__, e)


def _keeper_step() -> type:
    from celery import bootsteps

    class LeaseKeeper(bootsteps.StartStopStep):
        """Worker main process: keep this worker's messages invisible and its leases alive while it lives."""

        requires = {"celery.worker.consumer.tasks:Tasks"}

        def __init__(self, c: Any, **kwargs: Any) -> None:
            super().__init__(c, **kwargs)
            self.tref = None
            self.owned: set[str] = set()

        def start(self, c: Any) -> None:
            conf = c.app.conf
            broker = conf.get("broker_url")
            self.index_key = (conf.get("broker_transport_options") or {}).get("unacked_index_key", "unacked_index")
            self.broker = redis_client(broker) if is_redis(broker) else None
            url = lease_url(conf)
            self.leases = redis_client(url) if url else None
            self.owner = c.hostname
            self.every, ttl, _ = timings(conf)
            self.ttl_ms = int(ttl * 1000)
            if self.tref is None and (self.broker is not None or self.leases is not None):
                self.tref = c.timer.call_repeatedly(self.every, self.tick)
                _log.info("lease keeper: renewing every %.1f s (lease TTL %.0f s)", self.every, ttl)

        def stop(self, c: Any) -> None:
            if self.tref is not None:
                self.tref.cancel()
                self.tref = None

        shutdown = stop

        def tick(self) -> None:
            from celery.worker import state

            try:
                now = time.time()
                held = list(state.requests.values())   # reserved, running and ETA-scheduled requests
                if self.broker is not None:
                    tags = {m.delivery_tag: now for m in (getattr(r, "message", None) for r in held)
                            if m is not None and m.delivery_tag}
                    if tags:
                        self.broker.zadd(self.index_key, tags, xx=True)
                if self.leases is not None:
                    running = {r.id for r in list(state.active_requests)}
                    pipe = self.leases.pipeline(transaction=False)
                    for tid in running:
                        pipe.eval(_RENEW, 1, LEASE_PREFIX + tid, self.owner, self.ttl_ms)
                    for tid in self.owned - running:
                        pipe.eval(_RELEASE, 1, LEASE_PREFIX + tid, self.owner)
                    pipe.execute()
                    self.owned = running
            except Exception as e:  # noqa: BLE001 - a Redis blip must not stop the worker; the next tick retries
                _log.warning("lease renewal failed (%s: %s); retrying in %.0f s", type(e).__name__, e, self.every)

    return LeaseKeeper


def install(app: Any) -> None:
    """Add the LeaseKeeper bootstep to an app's worker consumer (once)."""
    if not getattr(app, "_quantgate_lease_keeper", False):
        app.steps["consumer"].add(_keeper_step())
        app._quantgate_lease_keeper = True
