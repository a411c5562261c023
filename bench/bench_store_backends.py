"""Upsert throughput of the two store backends (candles/s): SQLite (a file) vs PostgreSQL
(a scratch database on the local server, dropped afterwards).

    .venv/bin/python -m bench.bench_store_backends [--year-batch N] [--skip-year]

Scenarios, each on a fresh store: live-like 400-candle batches appended at the head (one
transaction each); the same batches again (every candle UNCHANGED); a year of 1m candles
(525,600) in large batches, as an import would write them.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from decimal import Decimal
from pathlib import Path

import psycopg
import trio
from psycopg import sql

from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import open_store

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
SID = "binance:futures:BTC/USDT:1m"
BTC = SeriesId.parse("binance:futures:ETH/USDT:1m")  # the pipeline's series: apart from SID
YEAR = 525_600


def minutes(start: int, count: int) -> list[Candle]:
    out = []
    for i in range(count):
        p = Decimal(29_000 + (i % 977)) / 10
        out.append(
            Candle(
                start + 60 * i,
                p,
                p + Decimal("0.5"),
                p - Decimal("0.5"),
                p + Decimal("0.1"),
                Decimal("12.345"),
                Decimal("359012.4411"),
                42,
                Decimal("6.1"),
                Decimal("177000.12"),
            )
        )
    return out


def batches(candles: list[Candle], size: int) -> Iterator[list[Candle]]:
    for i in range(0, len(candles), size):
        yield candles[i : i + size]


async def timed(store: MarketStore, candles: list[Candle], size: int) -> float:
    start = time.perf_counter()
    for batch in batches(candles, size):
        await store.upsert(SID, batch, "rest")
    return len(candles) / (time.perf_counter() - start)


class _Nobody:
    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        return ()

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        return ()


async def pipeline_rate(store: MarketStore, candles: list[Candle], size: int) -> float:
    """IngestPipeline.run over ``candles`` in batches: upsert, derive 5m…1d, events."""
    tfs = [Timeframe.parse(t) for t in ("5m", "15m", "1h", "4h", "1d")]
    # the pipeline names the SQLite class today; both backends have its methods
    pipeline = IngestPipeline(store, _Nobody(), tfs, "bench")
    start = time.perf_counter()
    for batch in batches(candles, size):
        await pipeline.run(IngestBatch.of(BTC, batch, "ws"))
    return len(candles) / (time.perf_counter() - start)


async def pipeline_many_series_rate(store: MarketStore, series: int, minutes_n: int) -> float:
    """Live-like: each batch is one minute of ``series`` symbols (every bucket is touched
    by every batch), through IngestPipeline.run with 5m…1d derived."""
    tfs = [Timeframe.parse(t) for t in ("5m", "15m", "1h", "4h", "1d")]
    pipeline = IngestPipeline(store, _Nobody(), tfs, "bench")
    sids = [SeriesId.parse(f"binance:futures:S{i}/USDT:1m") for i in range(series)]
    rows = minutes(0, minutes_n)
    start = time.perf_counter()
    for c in rows:
        await pipeline.run(IngestBatch(tuple((sid, c) for sid in sids), "ws"))
    return series * minutes_n / (time.perf_counter() - start)


async def scenario(location: str | Path, year_batch: int, skip_year: bool) -> dict[str, float]:
    result: dict[str, float] = {}
    store = await open_store(location)
    result["pipeline 400-batches, 5 derived timeframes"] = await pipeline_rate(
        store, minutes(0, 20 * 400), 400
    )
    result["pipeline 200 series x 1 minute batches, 5 derived"] = await pipeline_many_series_rate(
        store, 200, 10
    )
    live = minutes(0, 100 * 400)
    result["400-batches, new"] = await timed(store, live, 400)
    result["400-batches, unchanged"] = await timed(store, live, 400)
    if not skip_year:
        year = minutes(10**9 - 10**9 % 60, YEAR)
        result[f"year in {year_batch}-batches, new"] = await timed(store, year, year_batch)
    await store.aclose()
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--year-batch", type=int, default=50_000)
    parser.add_argument("--skip-year", action="store_true")
    args = parser.parse_args()
    name = f"tc_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            lite = trio.run(scenario, Path(tmp) / "m.sqlite3", args.year_batch, args.skip_year)
        pg_url = f"postgresql://postgres@127.0.0.1:5432/{name}"
        pg = trio.run(scenario, pg_url, args.year_batch, args.skip_year)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
    for key in lite:
        sys.stdout.write(
            f"store upsert {key}: sqlite {lite[key]:,.0f}/s, postgresql {pg[key]:,.0f}/s"
            f" (postgresql/sqlite {pg[key] / lite[key]:.2f})\n"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
