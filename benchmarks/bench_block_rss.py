"""RSS after each block of a layer-streamed pass: the profile's bfloat16 imatrix collection (analyzer.collect) on one
512-token chunk of data/calibration.jsonl, stopped after N blocks. `before`: the GGUF page release and the per-block
heap trim disabled (the code before stop 19); `notrim`: only the heap trim disabled; `now`: the code as it is. Run it on an 8B-shaped F16 GGUF (docs/BENCHMARKS.md, "8B-shaped
run, stop 19"):

    .venv/bin/python benchmarks/bench_block_rss.py now /tmp/qg-scale/8b/f16.gguf 8
    MALLOC_MMAP_THRESHOLD_=1048576 .venv/bin/python benchmarks/bench_block_rss.py now ... # glibc threshold fixed
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


class _Stop(Exception):
    pass


def main() -> None:
    mode, model, n_blocks = sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 6
    if mode in ("before", "notrim"):
        import runtime.layer_stream as ls

        ls.release_free_memory = lambda: False
    if mode == "before":  # mapped pages never released
        import quant.gguf_reader as gr
        import quant.gguf_split as gs

        gr.GGUFFile.release = lambda self, t=None: None
        gs.GGUFSet.release = lambda self, t=None: None
    from analyzer.collect import collect_imatrix
    from runtime.datasets import load_dataset
    from runtime.tokenize import calibration_chunks

    texts = [s.text for s in load_dataset(ROOT / "data/calibration.jsonl").usable()]
    toks = calibration_chunks(model, texts, 512, 1)
    proc, t0, rows = psutil.Process(), time.perf_counter(), []

    def progress(i: int, n: int, what: str) -> None:
        rows.append({"block": i, "rss_mb": round(proc.memory_info().rss / 2**20), "s": round(time.perf_counter() - t0, 1)})
        print(mode, rows[-1], flush=True)
        if i >= n_blocks:
            raise _Stop

    try:
        collect_imatrix(model, [], tokens=toks, matmul_dtype="bfloat16", progress=progress)
    except _Stop:
        pass
    print(json.dumps({"mode": mode, "rows": rows}))


if __name__ == "__main__":
    main()
