#!/usr/bin/env bash
# make test-data: fetch real Binance klines from Binance's public archive (data.binance.vision)
# into .cache/binance/ with `tradecanvas fetch-archive` (each daily zip streamed, SHA-256
# verified against Binance's own .CHECKSUM before it is kept, retried with backoff), and lay
# them out like ../shared/data/binance/ so tests, replays and the acceptance script can use
# them on a machine without the shared folder. A re-run fetches only what is missing: the
# downloaded zips stay in .cache/binance/archive/ and are verified again instead.
#
# What it builds (the same days as the shared copies):
#   klines_1m_5m/futures_um/BTCUSDT-{1m,5m}-2025-07-06_2025-07-12.csv   (7 days, header)
#   klines_1m_5m/futures_um/BTCUSDT-{1m,5m}-2023-08-16.csv
#   klines_1m_daily_dump/spot/BTCUSDT-1m-2020-01-0{1,2,3}.{zip,zip.CHECKSUM,csv}
# The shared folder's OctoBot excerpts and the WS capture come from other projects (see its
# SOURCES.md) and are not in Binance's archive; tests that need them say so when they fail.
#
# BINANCE_ARCHIVE_URL points it at another copy of the archive (default data.binance.vision);
# PYTHON at another interpreter (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BINANCE_ARCHIVE_URL:-https://data.binance.vision}
PYTHON=${PYTHON:-.venv/bin/python}
OUT=.cache/binance
UM=$OUT/klines_1m_5m/futures_um

fetch() { "$PYTHON" -m tradecanvas fetch-archive --base-url "$BASE" "$@"; }

for interval in 1m 5m; do
  fetch BTCUSDT "$interval" --market um --from 2025-07-06 --to 2025-07-12 \
    --out "$OUT/archive/futures_um" --csv "$UM/BTCUSDT-$interval-2025-07-06_2025-07-12.csv"
  fetch BTCUSDT "$interval" --market um --from 2023-08-16 \
    --out "$OUT/archive/futures_um" --csv "$UM/BTCUSDT-$interval-2023-08-16.csv"
done
fetch BTCUSDT 1m --market spot --from 2020-01-01 --to 2020-01-03 \
  --out "$OUT/klines_1m_daily_dump/spot" --extract
echo "test data in $OUT (checksums verified)"
