#!/usr/bin/env bash
# Every benchmark, one command: bash benchmarks/run.sh   (results printed; copy them into docs/BENCHMARKS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --oracle
date -u; uname -m; nproc
.venv/bin/python benchmarks/bench_kernels.py --json out/bench_kernels.json
.venv/bin/python benchmarks/bench_kernels.py --types Q4_K,Q6_K,Q4_0 --shapes 4096x4096 --imatrix
.venv/bin/python benchmarks/bench_streaming.py
.venv/bin/python benchmarks/bench_finite.py
nice -n 10 .venv/bin/python benchmarks/bench_scale.py --shape 1b --types Q4_K_M,Q8_0 --repeat 2   # ~20 min: convert/quantize/validate/auto vs llama.cpp
# 8B-shaped (16 GB F16, ~45 GB scratch disk): .venv/bin/python benchmarks/bench_scale.py --shape 8b --stages convert,quantize --repeat 1
# FMA-free oracle vs a default-flags build (docs/EXACTNESS.md): point QUANTGATE_DEFAULT_GGML_LIB at its libggml-base.so
if [ -n "${QUANTGATE_DEFAULT_GGML_LIB:-}" ]; then
  .venv/bin/python benchmarks/compare_oracle_builds.py \
    --lib-a .venv/lib/python3.11/site-packages/llama_cpp/lib/libggml-base.so --lib-b "$QUANTGATE_DEFAULT_GGML_LIB"
fi
.venv/bin/python benchmarks/bench_auto_mix.py --model models/reference   # ~15 min: every mix (+imatrix) and auto at several budgets
