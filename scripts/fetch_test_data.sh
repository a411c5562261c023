#!/usr/bin/env bash
# make test-data: fetch real Binance klines from Binance's public archive (data.binance.vision)
# into .cache/binance/, verifying each daily zip against Binance's own .CHECKSUM, and lay
# them out like ../shared/data/binance/ so tests, replays and the acceptance script can use
# them on a machine without the shared folder.
#
# What it builds (the same days as the shared copies):
#   klines_1m_5m/futures_um/BTCUSDT-{1m,5m}-2025-07-06_2025-07-12.csv   (7 days, header)
#   klines_1m_5m/futures_um/BTCUSDT-{1m,5m}-2023-08-16.csv
#   klines_1m_daily_dump/spot/BTCUSDT-1m-2020-01-0{1,2,3}.{zip,zip.CHECKSUM,csv}
# The shared folder's OctoBot excerpts and the WS capture come from other projects (see its
# SOURCES.md) and are not in Binance's archive; tests that need them say so when they fail.
set -euo pipefail
cd "$(dirname "$0")/.."
BASE=${BINANCE_ARCHIVE_URL:-https://data.binance.vision}
OUT=.cache/binance
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

fetch_day() { # market(um|spot) symbol interval day -> extracted csv path on stdout
  local market=$1 symbol=$2 interval=$3 day=$4 prefix
  if [ "$market" = spot ]; then prefix=data/spot/daily/klines; else prefix=data/futures/um/daily/klines; fi
  local name="$symbol-$interval-$day.zip"
  local url="$BASE/$prefix/$symbol/$interval/$name"
  curl -fsSL --retry 3 -o "$TMP/$name" "$url"
  curl -fsSL --retry 3 -o "$TMP/$name.CHECKSUM" "$url.CHECKSUM"
  (cd "$TMP" && sha256sum -c --quiet "$name.CHECKSUM") >&2
  unzip -o -q "$TMP/$name" -d "$TMP/x" >&2
  echo "$TMP/x/$symbol-$interval-$day.csv"
}

to_six_columns() { # the archive's 12 columns (futures files have a header) -> open_time,...,volume
  grep -E '^[0-9]' "$1" | cut -d, -f1-6
}

week() { for d in 06 07 08 09 10 11 12; do echo "2025-07-$d"; done; }

mkdir -p "$OUT/klines_1m_5m/futures_um" "$OUT/klines_1m_daily_dump/spot"
for interval in 1m 5m; do
  dest="$OUT/klines_1m_5m/futures_um/BTCUSDT-$interval-2025-07-06_2025-07-12.csv"
  echo "open_time,open,high,low,close,volume" > "$dest.part"
  for day in $(week); do to_six_columns "$(fetch_day um BTCUSDT "$interval" "$day")" >> "$dest.part"; done
  mv "$dest.part" "$dest"
  dest="$OUT/klines_1m_5m/futures_um/BTCUSDT-$interval-2023-08-16.csv"
  { echo "open_time,open,high,low,close,volume"; to_six_columns "$(fetch_day um BTCUSDT "$interval" 2023-08-16)"; } > "$dest"
done
for day in 2020-01-01 2020-01-02 2020-01-03; do
  csv=$(fetch_day spot BTCUSDT 1m "$day")
  cp "$csv" "$OUT/klines_1m_daily_dump/spot/"
  cp "$TMP/BTCUSDT-1m-$day.zip" "$TMP/BTCUSDT-1m-$day.zip.CHECKSUM" "$OUT/klines_1m_daily_dump/spot/"
done
echo "test data in $OUT (checksums verified)"
