"""Real Redis and real Celery worker processes for the task tests: each test session starts its own redis-server on
a free port (--save '', so killing and restarting it is safe) and workers via `quantgate worker`. RabbitMQ tests
use the machine's RabbitMQ (scripts/test.sh starts it) in a throwaway vhost, with the test Redis as result backend.
Workers run with quantgate's DEFAULT reliability settings unless a test passes others."""
from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
QUANTGATE = [sys.executable, "-m", "quantgate.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(pred, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class RedisServer:
    """A throwaway redis-server on its own port; stop() and start() keep the port."""

    def __init__(self, folder: Path):
        self.port = free_port()
        self.folder = folder
        self.pidfile = folder / f"redis-{self.port}.pid"
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def ping(self) -> bool:
        r = subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True)
        return r.stdout.strip() == "PONG"

    def start(self) -> None:
        subprocess.run(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--daemonize", "yes",
                        "--save", "", "--appendonly", "no", "--pidfile", str(self.pidfile),
                        "--dir", str(self.folder), "--logfile", str(self.folder / f"redis-{self.port}.log")],
                       check=True)
        wait_for(self.ping, 10, "redis to answer")

    def stop(self) -> None:
        if self.pidfile.exists():
            pid = int(self.pidfile.read_text().strip())
            with _suppress():
                os.kill(pid, signal.SIGTERM)
            wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 10,
                     "redis to stop")


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (ProcessLookupError, FileNotFoundError))


class Worker:
    """A `quantgate worker` process (its own process group, so it can be killed whole)."""

    def __init__(self, name: str, folder: Path, env: dict[str, str], concurrency: int = 1,
                 celery_app: str | None = None):
        self.name = name
        self.pidfile = folder / f"{name}.pid"
        self.logfile = folder / f"{name}.log"
        common = ["--pidfile", str(self.pidfile), "--logfile", str(self.logfile), "-n", f"{name}@%h", "-l", "INFO"]
        if celery_app is None:     # the production entry point
            argv = QUANTGATE + ["worker", "--concurrency", str(concurrency)] + common
        else:                      # the same app plus test-only tasks (e.g. tests.tasks.slow_app)
            argv = [sys.executable, "-m", "celery", "-A", celery_app, "worker", "-Q", "quantgate", "-c",
                    str(concurrency), "--without-gossip", "--without-mingle"] + common
        self.proc = subprocess.Popen(argv, env=env, cwd=folder, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: self.logfile.exists() and "ready." in self.logfile.read_text(errors="replace"), 60,
                 f"worker {name} to be ready")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def children(self) -> list[psutil.Process]:
        return psutil.Process(self.pid).children(recursive=True)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """kill -9 the whole worker: main process and pool children at once."""
        with _suppress():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            with _suppress():
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()

    def log(self) -> str:
        return self.logfile.read_text(errors="replace") if self.logfile.exists() else ""


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    srv = RedisServer(tmp_path_factory.mktemp("redis"))
    srv.start()
    yield srv
    gc.collect()
    srv.stop()


def rabbitmq_up() -> bool:
    return bool(shutil.which("rabbitmqctl")) and subprocess.run(
        ["rabbitmq-diagnostics", "-q", "ping"], capture_output=True).returncode == 0


@pytest.fixture(scope="session")
def rabbit_vhost():
    """A throwaway vhost on the machine's RabbitMQ (so other users of the server never see our queues); one per
    session (rabbitmqctl is slow to start), its queue drains as every test waits for its jobs to end."""
    if not rabbitmq_up():
        pytest.skip("RabbitMQ is not running (scripts/test.sh starts it)")
    vhost = f"qgtest-{os.getpid()}-{free_port()}"
    subprocess.run(["rabbitmqctl", "-q", "add_vhost", vhost], check=True, capture_output=True)
    subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"], check=True,
                   capture_output=True)
    yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    subprocess.run(["rabbitmqctl", "-q", "delete_vhost", vhost], capture_output=True)


def _cluster(redis_server, tmp_path, monkeypatch, broker_url: str | None = None):
    """Worker environment + client app on the test Redis (or `broker_url`, results in the test Redis); yields a
    helper to start workers. Workers are stopped and the Redis database flushed afterwards."""
    from quantgate.config import load_settings

    env = {**os.environ, "QUANTGATE_BROKER_URL": broker_url or redis_server.url,
           "QUANTGATE_RESULT_BACKEND": redis_server.url, "QUANTGATE_CACHE_DIR": str(tmp_path / "cache"),
           "QUANTGATE_STORE_DIR": str(tmp_path / "store"), "QUANTGATE_WORKDIR": str(tmp_path / "jobs"),
           "PYTHONPATH": str(ROOT), "MLFLOW_DISABLE_TELEMETRY": "true",
           "QUANTGATE_PARAMS": str(tmp_path / "no-params.yaml"),
           "QUANTGATE_MODEL_ROOTS": str(tmp_path.parent)}  # workers read models under the test tmp folders
    for k in [k for k in env if k.startswith("QUANTGATE_")] + [k for k in os.environ if k.startswith("QUANTGATE_")
                                                                 and k not in env]:
        if k in env:
            monkeypatch.setenv(k, env[k])
        else:
            monkeypatch.delenv(k)      # e.g. a QUANTGATE_VISIBILITY_TIMEOUT of the caller: tests use the defaults
    env = {k: v for k, v in env.items() if not k.startswith("QUANTGATE_") or k in os.environ}
    from tasks.app import app, configure

    configure(app, load_settings())
    workers: list[Worker] = []

    class Cluster:
        folder = tmp_path
        workdir = tmp_path / "jobs"
        redis = redis_server
        broker = broker_url or redis_server.url

        def worker(self, name: str, concurrency: int = 1, celery_app: str | None = None, **extra_env: str
                   ) -> Worker:
            w = Worker(name, tmp_path, {**env, **extra_env}, concurrency, celery_app)
            workers.append(w)
            return w

    yield Cluster()
    gc.collect()  # AsyncResults made while sending unsubscribe in __del__: let them do it while Redis is up
    for w in workers:
        w.stop()
    if redis_server.ping():
        subprocess.run(["redis-cli", "-p", str(redis_server.port), "flushall"], capture_output=True)


@pytest.fixture
def cluster(redis_server, tmp_path, monkeypatch):
    """Redis broker and result backend (see _cluster)."""
    yield from _cluster(redis_server, tmp_path, monkeypatch)


@pytest.fixture
def rabbit_cluster(redis_server, rabbit_vhost, tmp_path, monkeypatch):
    """RabbitMQ broker (a quorum queue in a throwaway vhost), results and leases in the test Redis."""
    yield from _cluster(redis_server, tmp_path, monkeypatch, broker_url=rabbit_vhost)


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """A tiny model (fast jobs), a mid-size one (quantization lasts seconds: something to kill), and bad inputs."""
    from quantgate.sample import SampleShape, make_sample_checkpoint

    d = tmp_path_factory.mktemp("models")
    tiny = make_sample_checkpoint(d / "tiny", SampleShape(n_layer=1, n_embd=256, n_ff=512, n_vocab=256), seed=1)
    tiny2 = make_sample_checkpoint(d / "tiny2", SampleShape(n_layer=2, n_embd=256, n_ff=256, n_vocab=256), seed=2)
    mid = make_sample_checkpoint(d / "mid", SampleShape(n_layer=4, n_embd=768, n_ff=2048, n_vocab=2048), seed=3)
    corrupt = d / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 7)
    return {"tiny": tiny, "tiny2": tiny2, "mid": mid, "corrupt": corrupt, "missing": d / "no-such-model"}
