#!/usr/bin/env bash
# Set up .venv and run the main job: quantize the llama-shaped sample checkpoint to Q4_K_M, verify it and
# print its inspect table.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
QG=.venv/bin/quantgate
mkdir -p out
[ -f out/sample-llama/config.json ] || "$QG" sample --out out/sample-llama
"$QG" quantize --model out/sample-llama --precision Q4_K_M --out out/sample-llama-Q4_K_M.gguf
"$QG" verify out/sample-llama-Q4_K_M.gguf
"$QG" inspect out/sample-llama-Q4_K_M.gguf
