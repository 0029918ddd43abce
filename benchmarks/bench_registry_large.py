"""Peak memory of registering and downloading a large GGUF (default 2 GiB): each step runs in a fresh process and
reports its own peak RSS (ru_maxrss), so the figures are the step's, not the file generator's.

    .venv/bin/python benchmarks/bench_registry_large.py [--gib 2] [--server] [--work DIR] [--progress bar|plain|none]

--server also runs both steps through a real `mlflow server` (artifacts proxied through it: uploads and downloads
over HTTP). The file is a valid GGUF (F32 tensors of 256 MiB, written one at a time) so registration reads it as it
would a model. --progress (default bar): the steps report their bytes to the CLI's transfer view
(quantgate.transfer_view), drawn as the rich bar on a forced terminal into /dev/null. Everything is removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_STEP = r"""
import json, os, resource, sys, time
from registry.config import RegistrySettings
step, path, work = sys.argv[1], sys.argv[2], sys.argv[3]
env = {"QUANTGATE_STORE_DIR": os.path.join(work, "store")}
if os.environ.get("BENCH_SERVER"):
    env["QUANTGATE_MLFLOW_URI"] = os.environ["BENCH_SERVER"]
s = RegistrySettings.from_env(env=env)
view, events = None, [0, 0]
if os.environ["BENCH_PROGRESS"] != "none":  # the CLI's view: a rich bar on a (forced) terminal, or plain lines
    from rich.console import Console
    from quantgate.transfer_view import TransferView
    bar = os.environ["BENCH_PROGRESS"] == "bar"
    shown = TransferView(Console(file=open(os.devnull, "w"), force_terminal=bar), interactive=bar)
    def view(done, total, what):
        events[0] += 1
        events[1] = done
        shown(done, total, what)
t = time.perf_counter()
if step == "register":
    from registry.registration import register_gguf
    rv = register_gguf(path, settings=s, model_name="big", progress=view)
    out = rv.version
else:
    from registry.queries import download
    out = str(download("big/1", os.path.join(work, "dl"), settings=s, progress=view))
if view is not None:
    shown.close()
print(json.dumps({"step": step, "seconds": time.perf_counter() - t, "progress_events": events[0],
                  "last_bytes": events[1],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "out": out}))
"""


def make_gguf(path: Path, gib: float) -> int:
    """A GGUF of `gib` GiB: F32 tensors of 256 MiB each, each array created, written and freed in turn."""
    import numpy as np
    from gguf import GGUFWriter

    n = max(1, int(gib * 4))
    rows, cols = 16384, 4096  # 256 MiB of float32
    w = GGUFWriter(str(path), "llama")
    w.add_name("big-bench")
    for i in range(n):
        w.add_tensor_info(f"blk.{i}.ffn_up.weight", (rows, cols), np.dtype(np.float32), rows * cols * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for i in range(n):
        a = np.full((rows, cols), float(i), dtype=np.float32)
        w.write_tensor_data(a)
        del a
    w.close()
    return path.stat().st_size


def step(name: str, path: Path, work: Path, server: str | None, progress: str = "bar") -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_DISABLE_TELEMETRY": "true", "BENCH_PROGRESS": progress}
    env.pop("QUANTGATE_MLFLOW_URI", None)
    if server:
        env["BENCH_SERVER"] = server
    r = subprocess.run([sys.executable, "-c", _STEP, name, str(path), str(work)], env=env, capture_output=True,
                       text=True, timeout=3600)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def start_server(work: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port",
                             str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{work / 'srv.db'}",
                             "--artifacts-destination", (work / "srv-artifacts").as_uri()],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    raise SystemExit("mlflow server not healthy after 180 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0)
    ap.add_argument("--server", action="store_true")
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--progress", choices=("bar", "plain", "none"), default="bar",
                    help="the CLI's transfer view: rich bar (on a forced terminal), plain lines, or none")
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-reg-", dir=a.work))
    try:
        big = work / "big.gguf"
        size = make_gguf(big, a.gib)
        print(json.dumps({"file_bytes": size}))
        for mode in (["embedded"] + (["server"] if a.server else [])):
            sub = work / mode
            sub.mkdir()
            proc, url = start_server(sub) if mode == "server" else (None, None)
            try:
                for name in ("register", "download"):
                    print(json.dumps({"mode": mode, "progress": a.progress, **step(name, big, sub, url, a.progress)}))
            finally:
                if proc is not None:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=30)
            shutil.rmtree(sub, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
