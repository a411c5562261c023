"""A stored minute that comes again with the same values and Binance's extras it lacked
(written first through the HTTP write path, then brought by the stream or a REST repair):
the store merges them into the row, and the derived bars over that minute are derived again
and gain them too — quietly, as an unchanged bar: nothing republished, no event. On a real
SQLite file here; tests/store_pg/test_pipeline_extras.py runs the same on PostgreSQL."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import attrs

from tests.conftest import read_kline_csv
from tests.pipeline.test_commit import RecordingTarget
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.derive import aggregate
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import open_store

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
TFS = [Timeframe.parse(t) for t in ("5m", "15m")]
BTC5, BTC15 = (str(BTC.with_timeframe(tf)) for tf in TFS)


def without_extras(c: Candle) -> Candle:
    return attrs.evolve(
        c, quote_volume=None, trades=None, taker_buy_base=None, taker_buy_quote=None
    )


def fields(c: Candle) -> tuple[object, ...]:
    return attrs.astuple(c, recurse=False)


async def bars(store: MarketStore, sid: str) -> list[Candle]:
    return [s.candle for s in await store.range(sid, 0, 2**40)]


async def extras_arrive_later(store: MarketStore, data_dir: Path) -> None:
    """Binance's first 20 minutes of a day (its 12-column dump), written one by one without
    extras (the HTTP write path), then again with them: five one by one from the stream,
    the rest in one REST repair. The derived bars gain the extras once every part of theirs
    has them, and then equal the bars derived from the minutes with their extras."""
    dump = data_dir / "klines_1m_daily_dump" / "spot" / "BTCUSDT-1m-2020-01-01.csv"
    day = read_kline_csv(dump)[:20]
    assert all(c.trades for c in day)
    pipeline = IngestPipeline(store, RecordingTarget(), TFS, "fp", clock=lambda: 1_700_000_000.0)
    for c in day:
        await pipeline.run(IngestBatch.of(BTC, [without_extras(c)], "http"))
    assert [b.quote_volume for b in await bars(store, BTC5)] == [None] * 4
    for i, c in enumerate(day[:5]):  # the stream sends the first bucket's minutes again
        result = await pipeline.run(IngestBatch.of(BTC, [c], "ws"))
        assert (result.updates, result.events) == ((), ())  # the values are unchanged
        first = (await bars(store, BTC5))[0]
        assert (first.trades is not None) == (i == 4)  # once all five know theirs
    result = await pipeline.run(IngestBatch.of(BTC, day[5:], "rest"))
    assert (result.updates, result.events) == ((), ())
    stored = await store.range(str(BTC), 0, 2**40)
    assert [fields(s.candle) for s in stored] == [fields(c) for c in day]
    assert {s.source for s in stored} == {"http"}  # the stored text and source stay
    five = await bars(store, BTC5)
    want = [aggregate(c.candle_time, day[i : i + 5]) for i, c in enumerate(day) if i % 5 == 0]
    assert [fields(b) for b in five] == [fields(b) for b in want]
    assert five[0].trades == sum(c.trades or 0 for c in day[:5])
    fifteen = await bars(store, BTC15)
    assert [fields(b) for b in fifteen] == [fields(aggregate(day[0].candle_time, day[:15]))]
    assert fifteen[0].quote_volume == sum(c.quote_volume or Decimal(0) for c in day[:15])
    await store.aclose()


async def test_derived_bars_gain_the_extras_their_minutes_gained(
    tmp_path: Path, data_dir: Path
) -> None:
    await extras_arrive_later(await open_store(tmp_path / "m.sqlite3"), data_dir)
