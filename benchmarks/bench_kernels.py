"""Kernel throughput: quantgate's quantize vs ggml_quantize_chunk, per type, at 1 thread and all threads.

    .venv/bin/python benchmarks/bench_kernels.py [--shapes 4096x4096,11008x4096] [--types ...] [--repeat 3]

ggml is driven through ctypes on libggml-base (llama-cpp-python); its multi-thread figure splits the rows
into one contiguous chunk per thread, as llama-quantize does. Times are the best of --repeat runs, ours and ggml alternating.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quant  # noqa: E402
from quant.imatrix_policy import KERNEL_REQUIRES_IMATRIX  # noqa: E402
from tests import ggml_oracle  # noqa: E402

ALL_TYPES = ["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS", "TQ1_0",
             "TQ2_0", "MXFP4", "F16", "BF16"]
#: the search-heavy i-quants (`--types iq`); those ggml cannot run without an imatrix always get one
IQ_TYPES = ["IQ3_XXS", "IQ3_S", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S", "IQ1_M"]


def _best_pair(fa, fb, repeat: int) -> tuple[float, float]:
    """Best-of-`repeat` seconds of fa and fb, run alternately so load bursts on a shared machine hit both."""
    best_a = best_b = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fa()
        best_a = min(best_a, time.perf_counter() - t)
        t = time.perf_counter()
        fb()
        best_b = min(best_b, time.perf_counter() - t)
    return best_a, best_b


def ggml_threaded(x: np.ndarray, qtype: str, n_threads: int, imatrix=None) -> np.ndarray:
    """ggml_quantize_chunk over n_threads contiguous row chunks (ctypes releases the GIL)."""
    if n_threads <= 1:
        return ggml_oracle.ggml_quantize(x, qtype, imatrix)
    chunks = np.array_split(np.arange(x.shape[0]), n_threads)
    with ThreadPoolExecutor(n_threads) as ex:
        parts = list(ex.map(lambda idx: ggml_oracle.ggml_quantize(x[idx[0]: idx[-1] + 1], qtype, imatrix), chunks))
    return np.concatenate(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shapes", default="4096x4096,11008x4096")
    ap.add_argument("--types", default=",".join(ALL_TYPES), help="comma list; `iq` stands for every i-quant")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", default="", help="comma list of thread counts (default: 1 and all cores)")
    ap.add_argument("--imatrix", action="store_true", help="also pass a random importance matrix")
    ap.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = ap.parse_args()
    n_all = os.cpu_count() or 1
    rng = np.random.default_rng(0)
    rows = []
    print(f"# machine: {platform.processor() or platform.machine()}, {n_all} cores, python {platform.python_version()}")
    print(f"# {'type':6} {'shape':>11} {'thr':>3} {'ours s':>8} {'ggml s':>8} {'ratio':>6} {'Mw/s ours':>10} {'Mw/s ggml':>10}")
    for shp in args.shapes.split(","):
        r, c = (int(v) for v in shp.lower().split("x"))
        x = rng.standard_normal((r, c), dtype=np.float32)
        imat = rng.random(c, dtype=np.float32) + 0.1 if args.imatrix else None
        types = [u for v in args.types.split(",") for u in (IQ_TYPES if v.lower() == "iq" else [v])]
        for t in types:
            imat_t = imat
            if imat_t is None and t in KERNEL_REQUIRES_IMATRIX:
                imat_t = rng.random(c, dtype=np.float32) + 0.1
            for n_thr in ([int(v) for v in args.threads.split(",")] if args.threads else sorted({1, n_all})):
                with quant.threads(n_thr):
                    quant.quantize(x[:8], t, imatrix=imat_t)  # compile / warm up (and build i-quant tables)
                    ggml_oracle.ggml_quantize(x[:1], t, imat_t)  # ggml_quantize_init
                    ours, ref = _best_pair(lambda: quant.quantize(x, t, imatrix=imat_t),
                                           lambda: ggml_threaded(x, t, n_thr, imat_t), args.repeat)
                row = {"type": t, "shape": shp, "threads": n_thr, "ours_s": ours, "ggml_s": ref,
                       "ratio": ours / ref, "weights_per_s_ours": x.size / ours, "weights_per_s_ggml": x.size / ref,
                       "imatrix": imat_t is not None}
                rows.append(row)
                print(f"  {t:6} {shp:>11} {n_thr:>3} {ours:8.3f} {ref:8.3f} {ours / ref:6.2f} "
                      f"{x.size / ours / 1e6:10.1f} {x.size / ref / 1e6:10.1f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
