"""Peak RSS per phase of a cold `build_profile` (no cache): a sampler thread reads this process's RSS every 50 ms
and every phase boundary (imatrix, the sweep's input / each block / head) is logged, so the report says which phase
holds the peak and how far above the process's baseline (imports) it goes; tracemalloc is not used (torch and numpy
allocate outside Python's allocator).

    nice -n 5 .venv/bin/python benchmarks/rss_phases_analyzer.py MODEL_DIR [--out phases.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--calib", type=Path, default=ROOT / "data/calibration.jsonl")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import analyzer.profile as prof_mod
    import runtime.layer_stream as ls_mod

    phase = ["imports"]
    peaks: dict[str, dict] = {}
    t0 = time.perf_counter()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            r = _rss()
            p = peaks.setdefault(phase[0], {"peak_rss": 0, "start_s": round(time.perf_counter() - t0, 1)})
            p["peak_rss"] = max(p["peak_rss"], r)
            p["end_s"] = round(time.perf_counter() - t0, 1)
            time.sleep(0.05)

    def set_phase(name: str) -> None:
        prev = peaks.get(phase[0])
        if prev is not None:  # progress as it goes (a long run stopped early still says where it got)
            print(f"# {time.perf_counter() - t0:8.1f} s  {phase[0]:22s} peak so far {prev['peak_rss'] / 1e9:6.3f} GB",
                  flush=True)
        phase[0] = name

    orig_block, orig_head = ls_mod.LayerStream.block, ls_mod.LayerStream.head
    orig_imat, orig_sweep = prof_mod.cached_imatrix, prof_mod.streamed_sweep
    where = ["?"]

    @contextmanager
    def block(self, i):
        set_phase(f"{where[0]}:block")
        with orig_block(self, i) as layer:
            yield layer
        set_phase(f"{where[0]}:between")

    @contextmanager
    def head(self, *a, **k):
        set_phase(f"{where[0]}:head")
        with orig_head(self, *a, **k) as x:
            yield x
        set_phase(f"{where[0]}:after-head")

    def imat(*a, **k):
        where[0] = "imatrix"
        set_phase("imatrix:start")
        try:
            return orig_imat(*a, **k)
        finally:
            where[0] = "?"
            set_phase("after-imatrix")

    def sweep(*a, **k):
        where[0] = "sweep"
        set_phase("sweep:input")
        try:
            return orig_sweep(*a, **k)
        finally:
            set_phase("after-sweep")

    ls_mod.LayerStream.block, ls_mod.LayerStream.head = block, head
    prof_mod.cached_imatrix, prof_mod.streamed_sweep = imat, sweep
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    set_phase("imports-done")
    time.sleep(0.2)
    prof = prof_mod.build_profile(args.model, args.calib, cache=None)
    stop.set()
    th.join()
    import resource
    res = {"phases": peaks, "timings": prof.timings,
           "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
           "wall_s": round(time.perf_counter() - t0, 1)}
    for k, v in peaks.items():
        print(f"{k:22s} peak {v['peak_rss'] / 1e9:6.3f} GB  {v['start_s']:7.1f}-{v['end_s']:7.1f} s")
    print(json.dumps({k: res[k] for k in ("timings", "ru_maxrss", "wall_s")}))
    if args.out:
        args.out.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
