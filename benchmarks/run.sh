#!/usr/bin/env bash
# Every benchmark, one command: bash benchmarks/run.sh   (results printed; copy them into docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --oracle
date -u; uname -m; nproc
.venv/bin/python benchmarks/bench_kernels.py --json out/bench_kernels.json
.venv/bin/python benchmarks/bench_kernels.py --types Q4_K,Q6_K,Q4_0 --shapes 4096x4096 --imatrix
.venv/bin/python benchmarks/bench_streaming.py
