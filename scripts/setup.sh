#!/usr/bin/env bash
# Create .venv and install quantgate with everything it needs (torch pinned to the 2.13.0 CPU build).
#   bash scripts/setup.sh            # runtime + test dependencies
#   bash scripts/setup.sh --oracle   # also the ggml oracle (llama-cpp-python built FMA-free; ~10 min the first time)
#   bash scripts/setup.sh --oracle --browser   # and Debian's chromium (headless report checks; needs root + apt)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${QUANTGATE_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
stamp="$VENV/.quantgate-installed"
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing dependencies into $VENV (first time: a few minutes)" >&2
  "$VPY" -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' >&2 || true
  # torch first, pinned: a plain `torch` would pull a multi-GB CUDA build.
  "$VPY" -m pip install -q torch==2.13.0 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$VPY" -m pip install -q -e ".[test]" 2>&1 | grep -v '^WARNING: Location' >&2 || true
  "$VPY" -c "import torch, numba, gguf, quant, quantgate" >&2
  echo "$want" > "$stamp"
fi
for arg in "$@"; do
  case "$arg" in
    --oracle)
      install=--install
      "$VPY" -c "import llama_cpp" 2>/dev/null && install=""
      bash scripts/build_oracle.sh nofma "$install" "$VPY" >/dev/null ;;
    --browser)
      if ! command -v chromium >/dev/null 2>&1; then
        echo "setup: installing Debian's chromium for the headless report tests" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null
      fi ;;
    *) echo "setup: unknown option $arg" >&2; exit 2 ;;
  esac
done
