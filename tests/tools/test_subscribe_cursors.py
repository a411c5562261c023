"""``tradecanvas subscribe``'s cursors, without sockets: what each message moves, the
subscribe messages of a reconnection, and the repeats a resubscription may send."""

from __future__ import annotations

from typing import Final

from tradecanvas.tools.subscribe_cursors import SubscribeCursors

ONE: Final = "binance:futures:BTC/USDT:1m"
FIVE: Final = "binance:futures:BTC/USDT:5m"
T0: Final = 1751760000


def candle(t: int) -> dict[str, object]:
    return {"candle_time": t, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}


def test_the_first_subscription_is_what_was_asked() -> None:
    cursors = SubscribeCursors([ONE, FIVE, ONE], since=None, events_after=None, batch=True)
    assert cursors.subscribe_messages() == [
        {"type": "subscribe", "series_id": ONE, "since": None, "supports_batch": True},
        {"type": "subscribe", "series_id": FIVE, "since": None, "supports_batch": True},
    ]
    cursors = SubscribeCursors([ONE], since=T0, events_after=0, batch=False)
    assert cursors.subscribe_messages() == [
        {
            "type": "subscribe",
            "series_id": ONE,
            "since": T0,
            "supports_batch": False,
            "events_after": 0,
        }
    ]


def test_closed_candles_and_events_move_their_series_cursors_only() -> None:
    cursors = SubscribeCursors([ONE, FIVE], since=T0, events_after=None, batch=False)
    taken = [
        {"type": "candles_batch", "series_id": ONE, "candles": [candle(T0 + 60), candle(T0 + 120)]},
        {"type": "candle_closed", "series_id": FIVE, "candle": candle(T0 + 300)},
        {"type": "candle_forming", "series_id": ONE, "candle": candle(T0 + 180)},  # no move
        {"type": "system", "series_id": ONE, "event": "factor.rebuild", "event_id": 7},
        {"type": "system", "series_id": FIVE, "event": "factor.rebuild", "event_id": 9},
        {"type": "system", "series_id": ONE, "event": "factor.rebuild"},  # no id: no move
        {"type": "pong"},
        "not json at all",
    ]
    assert all(cursors.take(m) for m in taken)
    assert cursors.since == {ONE: T0 + 120, FIVE: T0 + 300}
    assert cursors.events_after == {ONE: 7, FIVE: 9}
    assert [m["since"] for m in cursors.subscribe_messages()] == [T0 + 120, T0 + 300]
    assert [m["events_after"] for m in cursors.subscribe_messages()] == [7, 9]


def test_a_gap_sent_again_by_a_resubscription_is_left_out() -> None:
    cursors = SubscribeCursors([ONE], since=T0, events_after=None, batch=False)
    gap = {"type": "gap", "series_id": ONE, "expected_next_time": T0 + 60, "actual_time": T0 + 180}
    assert cursors.take(gap)
    # the connection dropped before the candle after the hole: the gap comes again
    assert not cursors.take(dict(gap))
    assert cursors.take({"type": "candle_closed", "series_id": ONE, "candle": candle(T0 + 180)})
    later = gap | {"expected_next_time": T0 + 240, "actual_time": T0 + 300}
    assert cursors.take(later)


def test_a_truncation_moves_the_event_cursor_to_the_retention_mark() -> None:
    cursors = SubscribeCursors([ONE], since=None, events_after=3, batch=False)
    truncated = {"type": "events_truncated", "series_id": ONE, "events_after": 3, "pruned_upto": 40}
    assert cursors.take(truncated)
    assert cursors.events_after == {ONE: 40}  # not asked again after a reconnect
    assert cursors.take({"type": "system", "series_id": ONE, "event_id": 41})
    assert cursors.events_after == {ONE: 41}


def test_a_refused_series_is_not_asked_for_again() -> None:
    cursors = SubscribeCursors([ONE, FIVE], since=None, events_after=None, batch=False)
    error = {"type": "error", "code": "unknown_series", "message": "no", "series_id": FIVE}
    assert cursors.take(error)
    assert cursors.take({"type": "error", "code": "rate_limited", "message": "slow down"})
    assert cursors.active == [ONE]
    assert [m["series_id"] for m in cursors.subscribe_messages()] == [ONE]
