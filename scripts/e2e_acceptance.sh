#!/usr/bin/env bash
# Release gate: replay real Binance data through the real `tradecanvas serve` and check it as
# subscribers would, once per value of TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH.
#   scripts/e2e_acceptance.sh                          one `tradecanvas serve` (the default)
#   scripts/e2e_acceptance.sh --topology distributed   1 ingest + 2 edges + Redis + PostgreSQL,
#       with SIGKILL of the ingest (restarted) and of an edge mid-run (scripts/e2e_distributed.py;
#       skipped with the reason when a service does not answer, a failure with CI=true)
# Prints one line per check and "N passed, M failed"; exits non-zero on any failure; leaves no
# process behind, even when interrupted (the driver owns every child's process group).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/tradecanvas ]; then
  make -s install
fi
exec .venv/bin/python scripts/e2e_acceptance.py "$@"
