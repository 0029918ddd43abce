"""Finite check: quant.api's numba bit-pattern pass (all_finite_f32 on the kernels' threads) vs the chunked
np.isfinite it replaced, on one 5632 x 2048 float32 tensor (a 1.1B model's FFN weight), interleaved in one process.

    .venv/bin/python benchmarks/bench_finite.py [--rounds 4] [--threads 2]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quant  # noqa: E402
from quant.api import _all_finite, chunk_map  # noqa: E402


def _old(x: np.ndarray) -> bool:
    """The previous check: np.isfinite over 1M-element chunks on the kernels' threads."""
    flat, c = x.reshape(-1), 1 << 20
    return all(chunk_map(lambda s: bool(np.isfinite(flat[s:s + c]).all()), range(0, flat.size, c)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    x = np.random.default_rng(0).standard_normal((5632, 2048), dtype=np.float32)
    with quant.threads(args.threads):
        for bad in (np.nan, np.inf, -np.inf):  # both say the same before anything is timed
            y = x.copy()
            y[5000, 17] = bad
            assert not _all_finite(y) and not _old(y)
        assert _all_finite(x) and _old(x)
        for _ in range(args.rounds):
            t0 = time.perf_counter()
            _old(x)
            t1 = time.perf_counter()
            _all_finite(x)
            t2 = time.perf_counter()
            print(f"old chunked isfinite {t1 - t0:.4f}s  new numba {t2 - t1:.4f}s  ratio {(t2 - t1) / (t1 - t0):.2f}")


if __name__ == "__main__":
    main()
