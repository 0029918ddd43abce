"""Streaming memory: quantize a generated ~1.1B-parameter F16 checkpoint and measure the process's peak RSS.

    .venv/bin/python benchmarks/bench_streaming.py [--workdir /tmp/qg-1b] [--precision Q4_K_M] [--threads 0]

Bound checked (issue 2): peak RSS < 4 x (largest tensor's float32 size) + 300 MB.
The checkpoint is generated once (sharded safetensors, ~2.2 GB) and reused.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quantgate.sample import SHAPE_1B, _tensor_shapes, make_sample_checkpoint  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/qg-1b"))
    ap.add_argument("--precision", default="Q4_K_M")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the output GGUF")
    args = ap.parse_args()
    src = args.workdir / "tinyllama-shaped-f16"
    if not (src / "config.json").exists():
        t = time.perf_counter()
        make_sample_checkpoint(src, SHAPE_1B, seed=1, max_shard_bytes=1 << 30)
        print(f"generated {src} in {time.perf_counter() - t:.0f}s")
    shapes = _tensor_shapes(SHAPE_1B)
    n_params = sum(int(np.prod(s)) for _, s in shapes)
    largest = max(int(np.prod(s)) for _, s in shapes) * 4
    bound = 4 * largest + 300 * 2**20
    out = args.workdir / f"out-{args.precision}.gguf"
    cmd = [str(ROOT / ".venv/bin/quantgate"), "quantize", "--model", str(src), "--precision", args.precision,
           "--out", str(out), "--threads", str(args.threads), "--json"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        sys.exit(f"quantize failed: {proc.stderr.strip()}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    art = json.loads(proc.stdout)
    res = {"params": n_params, "largest_tensor_f32_bytes": largest, "peak_rss_bytes": peak, "bound_bytes": bound,
           "within_bound": peak < bound, "wall_s": wall, "out_bytes": art["nbytes"], "bpw": art["bits_per_weight"],
           "precision": args.precision}
    print(json.dumps(res, indent=2))
    if not args.keep:
        out.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
