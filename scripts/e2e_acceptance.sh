#!/usr/bin/env bash
# Release gate: replay real Binance data through the real `tradecanvas serve` and check it as
# subscribers would, once per value of TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH.
# Prints one line per check and "N passed, M failed"; exits non-zero on any failure; leaves no
# process behind, even when interrupted (the driver owns every child's process group).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/tradecanvas ]; then
  make -s install
fi
exec .venv/bin/python scripts/e2e_acceptance.py "$@"
