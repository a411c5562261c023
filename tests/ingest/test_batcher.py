"""ClosedBatcher, FormingThrottle and MinuteCache (pure): no trio, no I/O."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import candle, flat_minutes
from tradecanvas.ingest.batcher import (
    CATCH_UP_SIZE,
    BatchItem,
    ClosedBatcher,
    FormingThrottle,
    MinuteCache,
    hole_records,
)
from tradecanvas.ingest.minute_ranges import subtract_ranges
from tradecanvas.ingest.tracker import Released
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.derive import derive_bucket, derive_forming
from tradecanvas.wire.kline_csv import read_kline_csv

SID = SeriesId.parse("binance:futures:BTC/USDT:1m")
T0 = 1_751_760_000  # 2025-07-06 00:00 UTC, a 5m (and day) boundary


def minutes(start: int, count: int) -> list[Candle]:
    return list(flat_minutes(start, count))


def test_batcher_flushes_by_size_and_age_one_source_at_a_time() -> None:
    batcher = ClosedBatcher(max_size=3, flush_s=0.5)
    assert batcher.due_at() is None and batcher.oldest_at() is None
    ws = [Released(c, "ws") for c in minutes(T0, 2)]
    rest = [Released(c, "rest") for c in minutes(T0 + 120, 2)]
    batcher.add(SID, ws, now=10.0)
    assert batcher.due_at() == 10.5
    batcher.add(SID, rest, now=10.2)
    assert batcher.due_at() == float("-inf")  # full
    assert batcher.oldest_at() == 10.0
    first = batcher.take()
    assert [i.released.source for i in first if i.released] == ["ws", "ws"]
    assert batcher.due_at() == 10.7  # the oldest left is from 10.2
    assert batcher.oldest_at() == 10.2
    second = batcher.take()
    assert [i.time for i in second] == [T0 + 120, T0 + 180]
    assert batcher.take() == []


def test_minutes_found_absent_leave_the_hole_records_of_queued_candles() -> None:
    other = SeriesId.parse("binance:futures:ETH/USDT:1m")
    holes = ((T0, T0 + 300), (T0 + 600, T0 + 660))
    batcher = ClosedBatcher(max_size=10, flush_s=0.5)
    batcher.add(SID, [Released(c, "ws") for c in minutes(T0 + 900, 2)], 0.0, holes)
    batcher.add(other, [Released(c, "ws") for c in minutes(T0 + 900, 1)], 0.0, holes)
    batcher.add(SID, [Released(c, "ws") for c in minutes(T0 + 1020, 1)], 0.0)
    # a retry of the first hole's first three minutes found them absent
    batcher.forget_holes(SID, [(T0, T0 + 60), (T0 + 120, T0 + 180)])
    assert [i.holes for i in batcher.take()] == [
        ((T0 + 60, T0 + 120), (T0 + 180, T0 + 300), (T0 + 600, T0 + 660)),
        ((T0 + 60, T0 + 120), (T0 + 180, T0 + 300), (T0 + 600, T0 + 660)),
        holes,  # another series' holes are its own
        None,  # no record to write stays so
    ]
    assert subtract_ranges(holes, [(T0 - 60, T0 + 900)]) == ()
    assert subtract_ranges(holes, []) == holes


def test_a_commit_stores_the_newest_hole_record_of_each_series() -> None:
    other = SeriesId.parse("binance:futures:ETH/USDT:1m")
    older, newer = ((T0, T0 + 300),), ((T0 + 60, T0 + 300),)
    batcher = ClosedBatcher(max_size=10, flush_s=0.5)
    batcher.add(SID, [Released(c, "ws") for c in minutes(T0 + 900, 1)], 0.0, older)
    batcher.add(other, [Released(c, "ws") for c in minutes(T0 + 900, 1)], 0.0, ())
    batcher.add(SID, [Released(c, "ws") for c in minutes(T0 + 960, 1)], 0.0, newer)
    batcher.add(SID, [Released(c, "ws") for c in minutes(T0 + 1020, 1)], 0.0)
    assert hole_records(batcher.take()) == {SID: newer, other: ()}
    assert hole_records([]) == {}


def test_forming_throttle_keeps_the_latest_and_sends_it_when_due() -> None:
    throttle: FormingThrottle[str] = FormingThrottle(0.25)
    a, b, c = (candle(T0, "1", "2", "1", close) for close in ("1", "1.5", "2"))
    assert throttle.offer("s", a, now=0.0) is a
    assert throttle.offer("s", b, now=0.1) is None
    assert throttle.offer("s", c, now=0.2) is None
    assert throttle.next_due() == 0.25
    assert throttle.due(0.24) == []
    assert throttle.due(0.25) == [("s", c)]
    assert throttle.next_due() is None
    # a pending update of a bar that has closed is dropped
    assert throttle.offer("s", a, now=0.3) is None
    throttle.discard("s", T0)
    assert throttle.next_due() is None
    assert FormingThrottle[str](0.0).offer("s", a, now=0.0) is a


def test_forming_5m_from_cached_minutes_matches_binance(data_dir: Path) -> None:
    """The forming 5m candle at the bucket's last minute equals Binance's closed 5m bar."""
    folder = data_dir / "klines_1m_5m" / "futures_um"
    one = read_kline_csv(folder / "BTCUSDT-1m-2025-07-06_2025-07-12.csv")[:15]
    five = read_kline_csv(folder / "BTCUSDT-5m-2025-07-06_2025-07-12.csv")[:3]
    tf = Timeframe.parse("5m")
    cache = MinuteCache(span_s=tf.seconds + 60)
    for i in range(3):
        bucket = one[5 * i : 5 * i + 5]
        cache.add(SID, bucket[:4])
        stored, previous_close = cache.bucket(SID, tf, bucket[4].candle_time)
        assert [m.candle_time for m in stored] == [m.candle_time for m in bucket[:4]]
        assert previous_close == (one[5 * i - 1].close if i else None)
        forming = derive_forming(tf, stored, bucket[4], previous_close)
        assert forming is not None and forming.same_values(five[i])
        cache.add(SID, bucket[4:])
    # older minutes are trimmed
    assert cache.bucket(SID, tf, one[0].candle_time + 60)[0] == []
    assert derive_bucket(five[0].candle_time, tf, one[:5]) is not None


def test_absent_runs_go_with_either_source_in_release_order() -> None:
    batcher = ClosedBatcher(max_size=10, flush_s=0.5)
    batcher.add_items([BatchItem(SID, None, 0.0, (), (T0, T0 + 120))])
    batcher.add(SID, [Released(c, "rest") for c in minutes(T0 + 120, 1)], 0.0)
    batcher.add_items([BatchItem(SID, None, 0.0, (), (T0 + 180, T0 + 240))])
    batcher.add(SID, [Released(c, "ws") for c in minutes(T0 + 240, 1)], 0.0)
    first = batcher.take()
    assert [(i.time, i.absent is not None) for i in first] == [
        (T0, True),
        (T0 + 120, False),
        (T0 + 180, True),
    ]
    assert [i.time for i in batcher.take()] == [T0 + 240]
    only_absent = ClosedBatcher(max_size=10, flush_s=0.5)
    only_absent.add_items([BatchItem(SID, None, 0.0, None, (T0, T0 + 60))])
    assert [i.candle for i in only_absent.take()] == [None]


@given(
    st.lists(
        st.tuples(
            st.integers(0, 40),  # minute
            st.sampled_from(("0", "1", "2.5")),  # volume (0: an empty minute)
            st.integers(1, 9),  # price
            st.booleans(),  # query a forming bar after this add
        ),
        max_size=40,
    ),
    st.sampled_from(("5m", "15m", "1h")),
)
def test_summed_bucket_parts_derive_the_same_forming_bars(
    steps: list[tuple[int, str, int, bool]], text: str
) -> None:
    """bucket_part (minutes summed incrementally) and bucket (the minutes) give the same
    forming bar, whatever the order minutes arrive in, replaced or not."""
    tf = Timeframe.parse(text)
    cache = MinuteCache(span_s=tf.seconds + 60)
    newest = -1
    for minute, volume, price, query in steps:
        p = str(price)
        cache.add(SID, [candle(T0 + 60 * minute, p, p, p, p, volume)])
        newest = max(newest, minute)
        if query:
            forming = candle(T0 + 60 * (newest + 1), "5", "6", "4", "5", "1")
            t = forming.candle_time
            stored, previous_close = cache.bucket(SID, tf, t)
            expected = derive_forming(tf, stored, forming, previous_close)
            part, part_previous_close = cache.bucket_part(SID, tf, t)
            got = derive_forming(tf, part, forming, part_previous_close)
            assert repr(got) == repr(expected)


def test_a_committer_behind_takes_up_to_the_catch_up_size() -> None:
    """Up to ``max_size`` waiting: a commit takes them; more (the committer is behind): up
    to CATCH_UP_SIZE, so the backlog drains instead of growing by each commit's arrivals."""
    batcher = ClosedBatcher(max_size=3, flush_s=0.0)
    batcher.add(SID, [Released(c, "ws") for c in minutes(T0, 3)], now=1.0)
    assert len(batcher.take()) == 3
    behind = CATCH_UP_SIZE + 5
    batcher.add(SID, [Released(c, "ws") for c in minutes(T0 + 180, behind)], now=2.0)
    assert [len(batcher.take()), len(batcher.take())] == [CATCH_UP_SIZE, 5]
