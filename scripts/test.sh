#!/usr/bin/env bash
# Set up (.venv + the ggml oracle) and run the whole test suite. CI runs exactly this.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --oracle --browser
export QUANTGATE_REQUIRE_ORACLE=1
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
