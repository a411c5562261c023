"""Forming derived bars and the store's history start over real sockets (replay, REST,
SQLite, IngestPipeline; tests/ingest/rig.py): the loop loads where each series' stored
history starts, and a day that began before it gets neither a forming nor a closed 1d bar.
The rule itself is tested without sockets in test_forming_history.py."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import attrs
import pytest

from tests.ingest.rig import BTC, BTC_5M, DAY, RecordingHub, day_replay, day_rows, ingest_rig
from tradecanvas.model import Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.store.sqlite import CandleStore

BTC_1D = "binance:futures:BTC/USDT:1d"


@pytest.mark.parametrize("from_yesterday", [False, True])
async def test_a_day_begun_before_the_stored_history_gets_no_forming_bar(
    tmp_path: Path, data_dir: Path, from_yesterday: bool
) -> None:
    """The store holds 2023-08-16 from 10:00 up to 23:49 — or from 00:10, and the day
    before up to 23:30 (a hole around midnight: the day is inside the history) —; the replay
    goes on from 23:50. The 5m forming bars go out either way; the 1d ones only when the day
    is inside the stored history, and then they count every stored minute of it. (With the
    hole, the minutes loaded below the head do not reach back to the day before: the loop
    must have loaded where the store's history starts.)"""
    rows = day_rows(data_dir)
    first = 10 if from_yesterday else 600
    stored = rows[first:1430]
    if from_yesterday:
        before = [attrs.evolve(rows[0], candle_time=DAY - 60 * i) for i in range(60, 30, -1)]
        stored = before + stored
    store = await CandleStore.open(tmp_path / "market.sqlite3")
    try:  # committed as a backfill is: with the derived bars of the buckets it ends
        timeframes = (Timeframe.parse("5m"), Timeframe.parse("1d"))
        pipeline = IngestPipeline(store, RecordingHub(), timeframes, "test-fingerprint")
        await pipeline.run(IngestBatch.of(BTC, stored, "rest"))
    finally:
        await store.aclose()
    config = day_replay(data_dir, start_at=1430, speed=1200.0, forming_per_bar=1)
    async with ingest_rig(
        tmp_path,
        replay=config,
        derived_timeframes="5m,1d",
        market_forming_min_interval_ms="0",
    ) as rig:
        await rig.hub.wait_closed(str(BTC), DAY + 1439 * 60)
        assert rig.hub.of_type("candle_forming", BTC_5M)
        daily = [m["candle"] for m in rig.hub.of_type("candle_forming", BTC_1D)]
        day_closed = rig.hub.closed_times(BTC_1D)
        assert rig.hub.overtaken() == []
    if not from_yesterday:
        # Binance's day opened at 00:00; the store's history at 10:00: no bar of it at all
        assert daily == [] and day_closed == []
        return
    # the day's bar is of the minutes stored (as its closed bar, stored incomplete)
    assert daily and day_closed == [DAY]
    assert all(c["candle_time"] == DAY for c in daily)
    assert Decimal(str(daily[0]["open"])) == rows[first].open
    mine = rows[first:1430]
    assert Decimal(str(daily[-1]["volume"])) >= sum((r.volume for r in mine), Decimal(0))
    assert Decimal(str(daily[-1]["low"])) <= min(r.low for r in mine)
