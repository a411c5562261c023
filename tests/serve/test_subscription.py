"""One subscription's cursor rules, without I/O: what goes out, where a gap is, where a hole
still needs a store read."""

from __future__ import annotations

from typing import Final

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import flat_minutes
from tradecanvas.model import Candle
from tradecanvas.serve.outgoing import ClosedCandles, Gap
from tradecanvas.serve.subscription import (
    Subscription,
    forming_in_step,
    has_hole,
    in_step,
    plan_closed,
    sent_in_step,
    split_at_unverified_hole,
)

SID: Final = "binance:futures:BTC/USDT:1m"
T0: Final = 1751760000


def at(*offsets: int) -> list[Candle]:
    return [next(iter(flat_minutes(T0 + 60 * i, 1))) for i in offsets]


def test_plan_closed_skips_the_cursor_and_reports_gaps_only_after_an_anchor() -> None:
    sub = Subscription(SID, 60, since=T0 + 60, batch=True)
    # not anchored yet (no stored candle at the cursor seen): a hole is no gap
    assert plan_closed(sub, at(0, 1, 3, 4)) == [ClosedCandles(SID, tuple(at(3, 4)), True)]
    assert (sub.cursor, sub.anchored) == (T0 + 240, True)
    # anchored now: the hole after 4 is a gap, and the run is split there
    assert plan_closed(sub, at(4, 5, 8)) == [
        ClosedCandles(SID, tuple(at(5)), True),
        Gap(SID, T0 + 360, T0 + 480),
        ClosedCandles(SID, tuple(at(8)), True),
    ]
    assert sub.cursor == T0 + 480
    assert plan_closed(sub, at(7, 8)) == []  # at or below the cursor: nothing, cursor kept
    assert sub.cursor == T0 + 480


def test_a_hole_is_verified_once_a_store_read_started_after_the_candle_above_it() -> None:
    sub = Subscription(SID, 60, since=T0, batch=False)
    candles = at(1, 2, 5, 6)
    assert split_at_unverified_hole(sub, candles) == (at(1, 2), at(5, 6))
    sub.verified_upto = T0 + 300
    assert split_at_unverified_hole(sub, candles) == (candles, [])
    assert not has_hole(sub)
    sub.pending = {c.candle_time: c for c in at(1, 2)}
    assert not has_hole(sub)
    sub.pending.update((c.candle_time, c) for c in at(4))
    assert has_hole(sub)
    # a since: null subscription before its catch-up has no cursor: no hole yet
    assert not has_hole(Subscription(SID, 60, since=None, batch=False))


def caught_up_at(cursor: int, *, batch: bool, anchored: bool) -> Subscription:
    sub = Subscription(SID, 60, since=cursor, batch=batch)
    sub.needs_sync = sub.probe_anchor = False
    sub.anchored = anchored
    return sub


@given(
    offsets=st.lists(st.integers(min_value=-2, max_value=4), max_size=6),
    batch=st.booleans(),
    anchored=st.booleans(),
)
def test_in_step_means_the_drain_would_send_exactly_these_candles(
    offsets: list[int], batch: bool, anchored: bool
) -> None:
    """Whenever candles may go out at once, the queue's own rule (plan_closed) would send
    exactly them, in one message, and move the cursor the same way."""
    times = sorted({T0 + 60 * (10 + o) for o in offsets})
    candles = [next(iter(flat_minutes(t, 1))) for t in times]
    cursor = T0 + 600
    direct = caught_up_at(cursor, batch=batch, anchored=anchored)
    drained = caught_up_at(cursor, batch=batch, anchored=anchored)
    if not in_step(direct, candles):
        # something a drain would not send as is: at or below the cursor, or a hole the
        # drain reads the store for first
        drained.pending = {c.candle_time: c for c in candles}
        assert not candles or times[0] <= cursor or has_hole(drained)
        return
    assert plan_closed(drained, candles) == [ClosedCandles(SID, tuple(candles), batch)]
    sent_in_step(direct, candles)
    assert (direct.cursor, direct.anchored) == (drained.cursor, drained.anchored)


def test_nothing_goes_at_once_while_something_is_owed() -> None:
    candle = at(11)
    sub = caught_up_at(T0 + 600, batch=False, anchored=True)
    assert in_step(sub, candle) and forming_in_step(sub, candle[0])
    for owed in ("needs_sync", "needs_events"):
        setattr(sub, owed, True)
        assert not in_step(sub, candle) and not forming_in_step(sub, candle[0])
        setattr(sub, owed, False)
    sub.heal_target = T0 + 700
    assert not in_step(sub, candle)
    sub.heal_target = None
    sub.pending = {T0 + 660: candle[0]}
    assert not in_step(sub, at(12))
    sub.pending = {}
    assert not forming_in_step(sub, at(10)[0])  # at the cursor
    assert not in_step(Subscription(SID, 60, since=None, batch=False), candle)
