"""A series' first derived bars (pipeline/bars.py): Binance's first bar of a listing is an
ordinary bar of the minutes there (its open time the bucket's: a listing at 08:33 has a 1d
bar at 00:00, a 4h bar at 08:00, a 5m bar at 08:30), so the pipeline stores one for the
bucket its listing lies in, complete, with no ``gap``. A history that merely starts inside a
bucket (no listing) still gives that bucket no bar: Binance's holds minutes the store never
had."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.conftest import read_kline_csv
from tests.pipeline.test_apply import FastRig
from tradecanvas.model import DAY, MINUTE, Candle, SeriesId, Timeframe
from tradecanvas.pipeline.batch import IngestBatch
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.pipeline.derive import aggregate_reference, derive_series
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.txn import StoreTxn
from tradecanvas.store.types import StoredCandle

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
SPOT = SeriesId.parse("binance:spot:BTC/USDT:1m")
# 2020-05-31, a Sunday and a month's last day: its day, week and month end together
LAST_DAY = 1_590_883_200
END = LAST_DAY + DAY + 10 * MINUTE  # the data runs to 00:09 of the next day (exclusive)
ALL = tuple(Timeframe.parse(t) for t in ("5m", "15m", "1h", "4h", "1d", "1w", "1M"))
GRID = ALL[:-1]  # every grid fixed: live minutes take the short way


def _tfs(text: str) -> tuple[Timeframe, ...]:
    return tuple(Timeframe.parse(t) for t in text.split(","))


def _minutes(listed: int, volumes: Sequence[int], holes: frozenset[int]) -> list[Candle]:
    """From ``listed`` to END: prices that wander, empty minutes flat at the last close,
    the minutes at ``holes`` (indexes from the listing, never the first) missing."""
    out: list[Candle] = []
    close = Decimal(100)
    for i, t in enumerate(range(listed, END, MINUTE)):
        volume = volumes[i % len(volumes)]
        if volume:
            open_ = close + (i % 3) - 1
            close = open_ + (i % 5) - 2
            high, low = max(open_, close) + 1, min(open_, close) - 1
        else:
            open_ = high = low = close
        if i not in holes:
            out.append(Candle(t, open_, high, low, close, Decimal(volume)))
    return out


def _expected(
    tf: Timeframe, minutes: Sequence[Candle], listed: int | None
) -> list[tuple[Candle, bool]]:
    """Binance's bars, plainly: a bar for every bucket with a stored minute whose last minute
    the history reached, complete when it holds every minute Binance has of the bucket (from
    the listing on); none for a bucket the history starts inside without a listing."""
    head = minutes[-1].candle_time
    first = minutes[0].candle_time
    bars: list[tuple[Candle, bool]] = []
    bucket = tf.floor(first)
    while tf.next_open(bucket) - MINUTE <= head:
        end = tf.next_open(bucket)
        parts = [m for m in minutes if bucket <= m.candle_time < end]
        start = bucket if listed is None else max(bucket, listed)
        if parts and (bucket >= first or listed is not None):
            before = [m for m in minutes if m.candle_time < bucket]
            previous = before[-1].close if before else None
            bar = aggregate_reference(bucket, parts, previous)
            bars.append((bar, len(parts) == (end - start) // MINUTE))
        bucket = end
    return bars


def _stored(rig: FastRig, sid: str) -> list[tuple[Candle, bool]]:
    rows = rig.conn.execute(
        "SELECT candle_time FROM candles WHERE series_id = ? ORDER BY candle_time", (sid,)
    ).fetchall()
    stored = StoreTxn(rig.conn).range(sid, rows[0][0], rows[-1][0] + 1) if rows else []
    return [(s.candle, s.complete) for s in stored]


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    listed_at=st.integers(17 * 60, 24 * 60 - 1),  # minute of the month's last day
    volumes=st.lists(st.sampled_from([0, 1, 2, 3]), min_size=1, max_size=9),
    holes=st.frozensets(st.integers(1, 300), max_size=6),
    chunks=st.lists(st.integers(1, 400), min_size=1, max_size=6),
    live=st.booleans(),
    is_listing=st.booleans(),
    timeframes=st.sampled_from([ALL, GRID, _tfs("15m,4h,1w")]),
)
@example(
    listed_at=20 * 60,
    volumes=[1],
    holes=frozenset(),
    chunks=[1],
    live=True,
    is_listing=True,
    timeframes=GRID,
)  # a listing on a 4h boundary, minute by minute (the short way)
@example(
    listed_at=23 * 60 + 59,
    volumes=[0],
    holes=frozenset(),
    chunks=[1],
    live=False,
    is_listing=True,
    timeframes=ALL,
)  # the day's last minute, no trade: the 1d, 1w and 1M bars of one empty minute
def test_a_listing_gets_binance_first_bars(
    listed_at: int,
    volumes: list[int],
    holes: frozenset[int],
    chunks: list[int],
    live: bool,
    is_listing: bool,
    timeframes: tuple[Timeframe, ...],
) -> None:
    """For every listing minute, history and batching (one batch, chunks, or the listing
    minute then live minutes), each derived series holds Binance's bars: the listing's
    bucket included, complete unless a minute after the listing is missing (then
    incomplete with a ``gap``, like any bucket); ``new_series`` from the listing's bucket.
    Without a listing the bucket the history starts inside gets no bar (as before)."""
    listed = LAST_DAY + listed_at * MINUTE
    minutes = _minutes(listed, volumes, holes)
    rig = FastRig(timeframes)
    claim = ((BTC, listed),) if is_listing else ()
    events: list[SystemEvent] = []
    sizes = [1] if live else chunks
    i = 0
    while i < len(minutes):
        size = sizes[0] if i == 0 else (1 if live else sizes[i % len(sizes)])
        part = tuple((BTC, m) for m in minutes[i : i + size])
        events += rig.run(
            IngestBatch(part, "rest" if i == 0 else "ws", listed=claim if i == 0 else ())
        )[1]
        i += size
    for tf in timeframes:
        sid = str(BTC.with_timeframe(tf))
        want = _expected(tf, minutes, listed if is_listing else None)
        assert _stored(rig, sid) == want, tf
        news = [(e.from_time) for e in events if e.series_id == sid and e.reason == "new_series"]
        assert news == ([want[0][0].candle_time] if want else []), tf
        gaps = {e.from_time for e in events if e.series_id == sid and e.event == "gap"}
        assert gaps == {c.candle_time for c, done in want if not done}, tf
    if is_listing and not holes:
        # the helper of tests and replays says the same
        for tf in timeframes:
            if tf.fixed:
                got = derive_series(tf, minutes, listed=listed)
                assert [(d.candle, d.complete) for d in got] == _expected(tf, minutes, listed)


DATA = "klines_1m_daily_dump/spot"
DAY1 = 1_577_836_800  # 2020-01-01 00:00 UTC
LISTED = DAY1 + 8 * 3600 + 33 * MINUTE  # 08:33: inside a 5m, 15m, 1h, 4h and 1d bucket
DERIVED = _tfs("5m,15m,1h,4h,1d")  # 1d from 4h from 1h from 15m from 5m


class _Quiet:
    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        return []

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        return []


def _spot_minutes(data_dir: Path) -> list[Candle]:
    days = [read_kline_csv(data_dir / DATA / f"BTCUSDT-1m-2020-01-0{d}.csv") for d in (1, 2, 3)]
    return [m for day in days for m in day if m.candle_time >= LISTED]


async def _run(
    tmp_path: Path, minutes: list[Candle], listed: bool, live_upto: int = 0
) -> tuple[dict[str, list[StoredCandle]], list[SystemEvent]]:
    """The minutes through a real pipeline on SQLite: the first ``live_upto`` one by one
    (the first with the listing), the rest in one REST batch."""
    store = await CandleStore.open(tmp_path / f"listing-{listed}-{live_upto}.sqlite3")
    pipeline = IngestPipeline(store, _Quiet(), DERIVED, "fp")
    claim = ((SPOT, LISTED),) if listed else ()
    events: list[SystemEvent] = []
    for i, m in enumerate(minutes[:live_upto]):
        result = await pipeline.run(IngestBatch(((SPOT, m),), "ws", listed=claim if i == 0 else ()))
        events += result.events
    rest = tuple((SPOT, m) for m in minutes[live_upto:])
    result = await pipeline.run(IngestBatch(rest, "rest", listed=() if live_upto else claim))
    events += result.events
    stored = {tf.text: await store.range(str(SPOT.with_timeframe(tf)), 0, 2**40) for tf in DERIVED}
    await store.aclose()
    return stored, events


async def test_a_real_listing_day_gets_binance_first_bars(tmp_path: Path, data_dir: Path) -> None:
    """Spot BTCUSDT 2020-01-01..03 cut to start at 08:33 (a listing-like first day): the
    listing's 1d bar at 00:00 (summed from 4h, from 1h, …), 4h bar at 08:00 and 5m bar at
    08:30 are Binance's — its rule applied to the minutes there — and stored complete; the
    days and 4h bars after equal Binance's own bars; the same minute by minute (the live
    short way) and in one REST batch; no ``gap``. Without the listing, none of those first
    bars (the rule for a history that merely starts late)."""
    minutes = _spot_minutes(data_dir)
    stored, events = await _run(tmp_path, minutes, listed=True)
    first_day = [m for m in minutes if m.candle_time < DAY1 + DAY]
    day = stored["1d"]
    assert [s.candle.candle_time for s in day] == [DAY1, DAY1 + DAY, DAY1 + 2 * DAY]
    assert all(s.complete for rows in stored.values() for s in rows)
    assert day[0].candle == aggregate_reference(DAY1, first_day)
    assert day[0].candle.open == minutes[0].open  # the listing minute's, not a 00:00 one
    four = stored["4h"][0]
    assert four.candle == aggregate_reference(
        DAY1 + 8 * 3600, [m for m in minutes if m.candle_time < DAY1 + 12 * 3600]
    )
    assert stored["5m"][0].candle == aggregate_reference(LISTED - 3 * MINUTE, minutes[:2])
    higher = Path(data_dir) / "klines_higher/spot"
    for tf, rows in (("1d", day[1:]), ("4h", stored["4h"][1:])):
        binance = read_kline_csv(higher / f"BTCUSDT-{tf}-2020-01-01_2020-01-03.csv")
        by_time = {c.candle_time: c for c in binance}
        assert rows and all(s.candle.same_values(by_time[s.candle.candle_time]) for s in rows)
    news = {e.series_id: e.from_time for e in events if e.reason == "new_series"}
    assert news[str(SPOT.with_timeframe(DERIVED[4]))] == DAY1
    assert news[str(SPOT.with_timeframe(DERIVED[3]))] == DAY1 + 8 * 3600
    assert news[str(SPOT.with_timeframe(DERIVED[0]))] == LISTED - 3 * MINUTE
    assert not [e for e in events if e.event == "gap"]
    # minute by minute from the listing through the next day's first hour: the same
    live, live_events = await _run(tmp_path, minutes, listed=True, live_upto=len(first_day) + 60)
    assert live == stored
    assert sorted(map(_shape, live_events)) == sorted(map(_shape, events))
    # no listing (an import or initial backfill from 08:33): the buckets the history starts
    # inside get no bar, as before — Binance's 2020-01-01 bar has the minutes from 00:00
    late, late_events = await _run(tmp_path, minutes, listed=False)
    assert [rows[0].candle.candle_time for rows in late.values()] == [
        LISTED + 2 * MINUTE,
        LISTED + 12 * MINUTE,
        DAY1 + 9 * 3600,
        DAY1 + 12 * 3600,
        DAY1 + DAY,
    ]
    assert not [e for e in late_events if e.event == "gap"]


def _shape(e: SystemEvent) -> tuple[str, str, str]:
    return (e.series_id, e.event, e.reason)
