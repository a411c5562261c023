"""Stream IDs and the hole arithmetic."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.bus.ids import (
    ZERO,
    StreamId,
    StreamKeys,
    after_candle,
    after_event,
    candle_entry_id,
    candle_time_of,
    candles_missing_between,
    event_entry_id,
    event_id_of,
    events_missing_between,
)
from tradecanvas.errors import WireError
from tradecanvas.model import Timeframe


def test_entry_ids_are_open_milliseconds_and_event_ids() -> None:
    assert str(candle_entry_id(1_751_760_000)) == "1751760000000-0"
    assert candle_time_of(StreamId.parse(b"1751760000000-0")) == 1_751_760_000
    assert str(event_entry_id(42)) == "42-0"
    assert event_id_of(StreamId.parse("42-0")) == 42
    assert after_candle(None) == ZERO and after_event(0) == ZERO
    assert after_candle(60) == StreamId(60_000)


@given(st.integers(0, 2**40), st.integers(0, 2**40), st.integers(0, 5), st.integers(0, 5))
def test_ids_order_as_redis_orders_them(a: int, b: int, sa: int, sb: int) -> None:
    left, right = StreamId(a, sa), StreamId(b, sb)
    assert (left < right) == ((a, sa) < (b, sb))
    assert StreamId.parse(str(left)) == left


@pytest.mark.parametrize("raw", ["", "x-0", "1-", "-1", "1-0-0", "1.5-0"])
def test_a_bad_id_is_a_wire_error(raw: str) -> None:
    with pytest.raises(WireError):
        StreamId.parse(raw)


def test_an_id_that_is_no_candle_or_event_is_a_wire_error() -> None:
    with pytest.raises(WireError):
        candle_time_of(StreamId(60_001))
    with pytest.raises(WireError):
        candle_time_of(StreamId(60_000, 1))
    with pytest.raises(WireError):
        event_id_of(ZERO)


@pytest.mark.parametrize("tf", ["1m", "5m", "1h", "1d", "1w", "1M"])
@given(start=st.integers(0, 2_000), count=st.integers(1, 50), skip=st.integers(0, 49))
def test_a_hole_shows_exactly_when_bars_are_skipped(
    tf: str, start: int, count: int, skip: int
) -> None:
    timeframe = Timeframe.parse(tf)
    times = [timeframe.floor(1_700_000_000 + start * 86_400)]
    for _ in range(count):
        times.append(timeframe.next_open(times[-1]))
    # consecutive bars: no hole; leaving one out between two delivered bars: a hole
    assert not any(candles_missing_between(timeframe, a, b) for a, b in pairwise(times))
    if 0 < skip < len(times) - 1:
        assert candles_missing_between(timeframe, times[skip - 1], times[skip + 1])
    assert not candles_missing_between(timeframe, None, times[-1])


def test_event_holes() -> None:
    assert not events_missing_between(4, 5)
    assert events_missing_between(4, 6)


def test_keys_carry_the_prefix_and_give_the_series_back() -> None:
    keys = StreamKeys("t1:")
    sid = "binance:futures:BTC/USDT:USDT:5m"
    assert keys.series(sid) == "t1:candles:binance:futures:BTC/USDT:USDT:5m"
    assert keys.series_of(keys.series(sid).encode()) == sid
    assert (keys.events, keys.forming) == ("t1:events", "t1:forming")
    with pytest.raises(WireError):
        keys.series_of(b"t2:candles:x")
