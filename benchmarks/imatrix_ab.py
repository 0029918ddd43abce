"""Time, CPU and peak RSS of one bf16 `collect_imatrix` run of whichever tree is on PYTHONPATH (for interleaved
A/B runs of two trees; the printed sum of all entries shows whether both compute the same values).

    PYTHONPATH=/path/to/tree .venv/bin/python benchmarks/imatrix_ab.py LABEL MODEL_DIR [N_CHUNKS]
"""
import resource
import sys
import time
from pathlib import Path

from analyzer.collect import collect_imatrix
from runtime.datasets import load_dataset
from runtime.tokenize import calibration_chunks

label, model = sys.argv[1], Path(sys.argv[2])
n = int(sys.argv[3]) if len(sys.argv) > 3 else 12
ds = load_dataset(Path(__file__).resolve().parents[1] / "data/calibration.jsonl")
toks = calibration_chunks(model, [s.text for s in ds.usable()], 512, n)
t, c = time.perf_counter(), time.process_time()
im = collect_imatrix(model, [], n_chunks=n, tokens=toks, matmul_dtype="bfloat16")
print(label, "wall", round(time.perf_counter() - t, 1), "cpu", round(time.process_time() - c, 1),
      "maxrss", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1000, "MB",
      "sum", float(sum(e.sums.astype("float64").sum() for e in im.entries.values())), flush=True)
