"""Every Binance interval: alignment as Binance aligns it, and derived bars bit-equal to
Binance's own (``klines_higher/`` in the shared data), through the real pipeline and store."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from tests.pipeline.test_commit import RecordingTarget
from tradecanvas.model import (
    BINANCE_INTERVALS,
    DAY,
    MINUTE,
    Candle,
    SeriesId,
    Timeframe,
    derivation_sources,
)
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.derive import Part, aggregate, derive_parts, derive_series, parts_in
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.kline_csv import read_kline_csv

FUTURES_WEEK = "BTCUSDT-{}-2025-07-06_2025-07-12.csv"
SPOT_DAYS = "BTCUSDT-{}-2020-01-01_2020-01-03.csv"
FIELDS = ("candle_time", "open", "high", "low", "close", "volume")


def _at(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp())


def _differences(ours: list[Candle], theirs: list[Candle]) -> list[str]:
    mine = {c.candle_time: c for c in ours}
    bad = []
    for ref in theirs:
        got = mine.get(ref.candle_time)
        if got is None:
            bad.append(f"{ref.candle_time}: missing")
            continue
        for field in FIELDS:
            if getattr(got, field) != getattr(ref, field):
                bad.append(
                    f"{ref.candle_time} {field}: {getattr(got, field)} != {getattr(ref, field)}"
                )
    return bad


# --- alignment ---------------------------------------------------------------------------


def test_binance_intervals_all_parse_and_order_by_length() -> None:
    tfs = [Timeframe.parse(text) for text in BINANCE_INTERVALS]
    assert tfs == sorted(tfs)
    assert Timeframe.parse("1M") != Timeframe.parse("1m")


@pytest.mark.parametrize("text", ["2w", "3M", "0m", "1y", "1W"])
def test_lengths_binance_does_not_have_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="bad timeframe"):
        Timeframe.parse(text)


def test_weeks_open_on_monday_and_months_on_the_first() -> None:
    week, month = Timeframe.parse("1w"), Timeframe.parse("1M")
    t = _at("2024-02-29T13:45:00")  # a Thursday in a leap February
    assert week.floor(t) == _at("2024-02-26T00:00:00")
    assert week.next_open(week.floor(t)) == _at("2024-03-04T00:00:00")
    assert month.floor(t) == _at("2024-02-01T00:00:00")
    assert month.next_open(month.floor(t)) == _at("2024-03-01T00:00:00")
    assert month.minutes_in(_at("2024-02-01T00:00:00")) == 29 * 1440
    assert month.next_open(_at("2024-12-01T00:00:00")) == _at("2025-01-01T00:00:00")


def test_3d_follows_the_symbols_own_phase() -> None:
    three = Timeframe.parse("3d")
    assert three.phased
    # spot BTCUSDT: (days since epoch) mod 3 == 1, so 2020-01-01 opens a 3d bar
    jan1 = _at("2020-01-01T00:00:00")
    assert (jan1 // DAY) % 3 == 1
    assert three.floor(jan1 + 5 * 3600, phase=DAY) == jan1
    # USD-M BTCUSDT: mod 3 == 2, so its 3d bar holding 2020-01-01 opened on 2019-12-30
    assert three.floor(jan1, phase=2 * DAY) == jan1 - 2 * DAY


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(BINANCE_INTERVALS),
    st.integers(min_value=0, max_value=4_000_000_000),
    st.integers(min_value=0, max_value=2),
)
def test_every_bucket_holds_its_times_and_follows_the_last(text: str, t: int, days: int) -> None:
    tf = Timeframe.parse(text)
    phase = days * DAY
    start = tf.floor(t, phase)
    end = tf.next_open(start)
    assert start <= t < end
    assert tf.floor(start, phase) == start and tf.floor(end, phase) == end
    assert start % MINUTE == 0 and (end - start) % MINUTE == 0
    if tf.fixed:
        assert end - start == tf.seconds


def test_each_interval_is_summed_from_the_longest_one_nesting_in_it() -> None:
    tfs = [Timeframe.parse(t) for t in ("5m", "15m", "1h", "4h", "1d", "3d", "1w", "1M", "3m")]
    sources = {str(k): str(v) for k, v in derivation_sources(tfs).items()}
    assert sources == {
        "3m": "1m",
        "5m": "1m",
        "15m": "5m",
        "1h": "15m",
        "4h": "1h",
        "1d": "4h",
        "3d": "1d",
        "1w": "1d",
        "1M": "1d",
    }


# --- the rule is associative: summing sub-bars equals summing minutes -------------------


def _minute(t: int, price: int, move: int, volume: int) -> Candle:
    o = Decimal(price)
    c = Decimal(price + move)
    return Candle(t, o, max(o, c) + 1, min(o, c) - 1, c, Decimal(volume))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 50), st.integers(-5, 5), st.integers(0, 2)), min_size=60))
def test_bars_summed_from_sub_bars_equal_bars_summed_from_minutes(
    rows: list[tuple[int, int, int]],
) -> None:
    # empty minutes (volume 0) are flat at the previous close, as Binance sends them
    minutes: list[Candle] = []
    close: Decimal | None = None
    for i, (price, move, volume) in enumerate(rows):
        t = 1_700_000_000 - 1_700_000_000 % 3600 + i * MINUTE
        if volume == 0 and close is not None:
            minutes.append(Candle(t, close, close, close, close, Decimal(0)))
        else:
            minutes.append(_minute(t, 1000 + price, move, volume or 1))
        close = minutes[-1].close
    five, hour = Timeframe.parse("5m"), Timeframe.parse("1h")
    fives = derive_series(five, minutes, complete_only=False)
    direct = {d.candle.candle_time: d for d in derive_series(hour, minutes, complete_only=False)}
    by_bucket: dict[int, list[Part]] = {}
    for d in fives:
        by_bucket.setdefault(hour.floor(d.candle.candle_time), []).append(
            Part(d.candle, d.complete)
        )
    previous: Decimal | None = None
    for bucket in sorted(by_bucket):
        parts = by_bucket[bucket]
        summed = derive_parts(bucket, parts_in(five, hour, bucket), parts, previous)
        assert summed == direct[bucket]
        previous = parts[-1].candle.close


def test_an_all_empty_bucket_is_flat_at_the_previous_close() -> None:
    empty = [
        Candle(60 * i, Decimal(5), Decimal(5), Decimal(5), Decimal(5), Decimal(0)) for i in range(5)
    ]
    bar = aggregate(0, empty, Decimal(7))
    assert [bar.open, bar.high, bar.low, bar.close] == [Decimal(7)] * 4
    assert bar.volume == 0


# --- Binance's own bars, through the real pipeline and store -----------------------------


async def _derived_through_pipeline(
    tmp_path: Path, series: SeriesId, minutes: list[Candle], tfs: list[str], phase: int = 0
) -> dict[str, list[Candle]]:
    store = await CandleStore.open(tmp_path / "intervals.sqlite3")
    timeframes = [Timeframe.parse(t) for t in tfs]
    pipeline = IngestPipeline(store, RecordingTarget(), timeframes, "test")
    pipeline.set_phase(series, phase)
    try:
        for start in range(0, len(minutes), 997):  # batches that split buckets
            await pipeline.run(IngestBatch.of(series, minutes[start : start + 997], "rest"))
        result = {}
        for tf in timeframes:
            rows = await store.range(str(series.with_timeframe(tf)), 0, 2**40)
            assert all(r.complete for r in rows), tf
            result[tf.text] = [r.candle for r in rows]
        return result
    finally:
        await store.aclose()


async def test_futures_week_every_interval_equals_binances_bars(
    tmp_path: Path, data_dir: Path
) -> None:
    minutes = read_kline_csv(data_dir / "klines_1m_5m" / "futures_um" / FUTURES_WEEK.format("1m"))
    tfs = ["5m", "15m", "30m", "1h", "2h", "4h", "1d"]
    series = SeriesId.parse("binance:futures:BTC/USDT:1m")
    ours = await _derived_through_pipeline(tmp_path, series, minutes, tfs)
    counts = {}
    for tf in tfs:
        folder = "klines_1m_5m" if tf == "5m" else "klines_higher"
        theirs = read_kline_csv(data_dir / folder / "futures_um" / FUTURES_WEEK.format(tf))
        assert _differences(ours[tf], theirs) == []
        assert len(ours[tf]) == len(theirs)
        counts[tf] = len(theirs)
    assert counts == {"5m": 2016, "15m": 672, "30m": 336, "1h": 168, "2h": 84, "4h": 42, "1d": 7}


async def test_spot_days_every_interval_equals_binances_bars(
    tmp_path: Path, data_dir: Path
) -> None:
    folder = data_dir / "klines_1m_daily_dump" / "spot"
    minutes = [
        c
        for day in ("01", "02", "03")
        for c in read_kline_csv(folder / f"BTCUSDT-1m-2020-01-{day}.csv")
    ]
    tfs = ["30m", "1h", "4h", "8h", "12h", "1d", "3d"]
    series = SeriesId.parse("binance:spot:BTC/USDT:1m")
    ours = await _derived_through_pipeline(tmp_path, series, minutes, tfs, phase=DAY)
    for tf in tfs[:-1]:
        theirs = read_kline_csv(data_dir / "klines_higher" / "spot" / SPOT_DAYS.format(tf))
        assert _differences(ours[tf], theirs) == []
        assert len(ours[tf]) == len(theirs)
    # 2020-01-01 opens spot BTCUSDT's 3d bar; Binance's three 1d bars sum to it exactly
    days = read_kline_csv(data_dir / "klines_higher" / "spot" / SPOT_DAYS.format("1d"))
    assert len(ours["3d"]) == 1
    assert _differences(ours["3d"], [aggregate(_at("2020-01-01T00:00:00"), days)]) == []
    # the 12-column dump's extras are summed too (1d quote volume as Binance reports it)
    assert ours["1d"][0].trades == 194010


async def test_3d_waits_for_the_symbols_phase(tmp_path: Path) -> None:
    from tests.conftest import flat_minutes

    store = await CandleStore.open(tmp_path / "p.sqlite3")
    series = SeriesId.parse("binance:spot:ETH/USDT:1m")
    pipeline = IngestPipeline(
        store, RecordingTarget(), [Timeframe.parse(t) for t in ("1d", "3d")], "test"
    )
    try:
        start = _at("2020-01-01T00:00:00")
        await pipeline.run(IngestBatch.of(series, list(flat_minutes(start, 3 * 1440 + 1)), "rest"))
        assert await store.range("binance:spot:ETH/USDT:3d", 0, 2**40) == []
        assert len(await store.range("binance:spot:ETH/USDT:1d", 0, 2**40)) == 3
    finally:
        await store.aclose()


async def test_3d_history_is_derived_once_the_phase_is_learned(tmp_path: Path) -> None:
    from tests.conftest import flat_minutes

    store = await CandleStore.open(tmp_path / "p.sqlite3")
    series = SeriesId.parse("binance:spot:ETH/USDT:1m")
    pipeline = IngestPipeline(
        store, RecordingTarget(), [Timeframe.parse(t) for t in ("1d", "3d")], "test"
    )
    try:
        start = _at("2020-01-01T00:00:00")
        await pipeline.run(IngestBatch.of(series, list(flat_minutes(start, 6 * 1440 + 1)), "rest"))
        pipeline.set_phase(series, DAY)  # 2020-01-01 opens a bar
        result = await pipeline.derive_history(series, Timeframe.parse("3d"))
        bars = await store.range("binance:spot:ETH/USDT:3d", 0, 2**40)
        assert [b.candle.candle_time for b in bars] == [start, start + 3 * DAY]
        assert [u.series_id for u in result.updates] == ["binance:spot:ETH/USDT:3d"]
        assert [e.reason for e in result.events] == ["new_series"]
        again = await pipeline.derive_history(series, Timeframe.parse("3d"))
        assert again.updates == () and again.events == ()
    finally:
        await store.aclose()


def test_binances_second_bars_are_refused_saying_why() -> None:
    with pytest.raises(ValueError, match="seconds are finer than the 1m klines"):
        Timeframe.parse("1s")
