"""Derivation and the commit path against plain baselines on the same data.

- derive: ``derive_series`` (Binance-exact rule) vs. a naive first/max/min/last/sum loop.
- pipeline commit: ``IngestPipeline.run`` in batches of 200 (store + derive + events, WAL,
  synchronous=FULL) vs. a bare ``executemany`` of the same rows into an identical table.
"""

from __future__ import annotations

import sqlite3
import tempfile
from decimal import Decimal
from pathlib import Path

import trio

from bench.common import Result, best_of
from tests.conftest import binance_data_dir
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.derive import derive_series
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.kline_csv import read_kline_csv

WEEK = "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
BATCH = 200


def _minutes() -> list[Candle]:
    return read_kline_csv(binance_data_dir() / WEEK)


def bench_derive() -> Result:
    minutes = _minutes()
    tf = Timeframe.parse("5m")

    def naive() -> None:
        for i in range(0, len(minutes), 5):
            group = minutes[i : i + 5]
            Candle(
                group[0].candle_time,
                group[0].open,
                max(c.high for c in group),
                min(c.low for c in group),
                group[-1].close,
                sum((c.volume for c in group), Decimal(0)),
            )

    ours = best_of(5, lambda: derive_series(tf, minutes))
    base = best_of(5, naive)
    return Result("derive 1m→5m", ours, base, "naive aggregation", len(minutes), "minute")


class _Null:
    def publish_closed(self, series_id: str, candles: object) -> list[str]:
        return []

    def publish_system(self, event: SystemEvent) -> list[str]:
        return []


def bench_pipeline_commit() -> Result:
    minutes = _minutes()[:4000]
    series = SeriesId.parse("binance:futures:BTC/USDT:1m")

    def ours() -> None:
        async def go() -> None:
            with tempfile.TemporaryDirectory() as d:
                store = await CandleStore.open(Path(d) / "b.sqlite3")
                pipeline = IngestPipeline(store, _Null(), [Timeframe.parse("5m")], "fp")
                for i in range(0, len(minutes), BATCH):
                    await pipeline.run(IngestBatch.of(series, minutes[i : i + BATCH], "ws"))
                await store.aclose()

        trio.run(go)

    def baseline() -> None:
        with tempfile.TemporaryDirectory() as d:
            conn = sqlite3.connect(Path(d) / "b.sqlite3", isolation_level=None)
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(
                "CREATE TABLE c (s TEXT, t INTEGER, o TEXT, h TEXT, l TEXT, cl TEXT, v TEXT,"
                " PRIMARY KEY (s, t)) WITHOUT ROWID"
            )
            for i in range(0, len(minutes), BATCH):
                conn.execute("BEGIN")
                conn.executemany(
                    "INSERT INTO c VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [
                        (str(series), m.candle_time, str(m.open), str(m.high), str(m.low),
                         str(m.close), str(m.volume))
                        for m in minutes[i : i + BATCH]
                    ],
                )  # fmt: skip
                conn.execute("COMMIT")
            conn.close()

    return Result(
        "pipeline commit (batches of 200, +5m derive)",
        best_of(3, ours),
        best_of(3, baseline),
        "bare SQLite executemany",
        len(minutes),
        "candle",
    )
