"""One subscription's cursor rules, without I/O: what goes out, where a gap is, where a hole
still needs a store read."""

from __future__ import annotations

from typing import Final

from tests.conftest import flat_minutes
from tradecanvas.model import Candle
from tradecanvas.serve.outgoing import ClosedCandles, Gap
from tradecanvas.serve.subscription import (
    Subscription,
    has_hole,
    plan_closed,
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
