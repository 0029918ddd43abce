#!/usr/bin/env bash
# Set up (.venv + the ggml oracle) and run the whole test suite. CI runs exactly this.
#   bash scripts/test.sh [pytest args...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --oracle --browser
export QUANTGATE_REQUIRE_ORACLE=1
# The Celery tests start their own redis-server; `quantgate submit/worker` default to one on 6379.
if ! command -v redis-server >/dev/null; then
  echo "test: installing Debian's redis-server (the Celery tests need a real Redis)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null
fi
if ! redis-cli ping >/dev/null 2>&1; then
  redis-server --port 6379 --bind 127.0.0.1 --daemonize yes --save '' --appendonly no
fi
# The dead-worker tests (tests/security/test_dead_worker.py) also run on RabbitMQ, in a throwaway vhost.
if ! command -v rabbitmq-server >/dev/null; then
  echo "test: installing Debian's rabbitmq-server (the broker tests need a real RabbitMQ)" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq rabbitmq-server) >/dev/null
fi
if ! rabbitmq-diagnostics -q ping >/dev/null 2>&1; then
  rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 60); do rabbitmq-diagnostics -q ping >/dev/null 2>&1 && break; sleep 1; done
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider --durations=30 "$@"
