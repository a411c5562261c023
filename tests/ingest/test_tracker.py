"""SeriesTracker (pure): holes, late closes, REST fills, retries — no trio, no I/O."""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import flat_minutes
from tradecanvas.ingest.minute_ranges import subtract_ranges
from tradecanvas.ingest.tracker import (
    FILL_CHUNK_MINUTES,
    RECENT_KEEP,
    REST_LAG_MAX_MS,
    FillRequest,
    Released,
    SeriesTracker,
)
from tradecanvas.model import Candle

T0 = 1_751_760_000  # 2025-07-06 00:00 UTC, a 5m (and day) boundary
LATE_MS = 10_000


def tracker(head: int | None = T0 - 60, initial: int = 0) -> SeriesTracker:
    return SeriesTracker(head=head, initial_backfill=initial, late_close_ms=LATE_MS)


def minutes(start: int, count: int) -> list[Candle]:
    return list(flat_minutes(start, count))


def times(released: list[Released]) -> list[int]:
    return [r.candle.candle_time for r in released]


def reconnected(live: int, into_ms: int) -> tuple[SeriesTracker, FillRequest]:
    """A tracker headed at T0 whose new connection's first frame is minute ``live``,
    ``into_ms`` into it (exchange time), and the reconnect fill it asks for."""
    tr = tracker(head=T0)
    tr.on_live_frame(live, new_connection=True)
    tr.on_exchange_time(live * 1000 + into_ms)
    request = tr.next_fill(now=0.0)
    assert request == FillRequest(T0 + 60, live, "reconnect")
    return tr, request


def test_contiguous_closes_are_released_at_once_and_repeats_dropped() -> None:
    tr = tracker()
    bars = minutes(T0, 3)
    out: list[Released] = []
    for bar in bars:
        tr.on_live_frame(bar.candle_time, new_connection=False)
        out += tr.on_closed(bar, now=0.0)
    assert times(out) == [T0, T0 + 60, T0 + 120]
    assert [r.source for r in out] == ["ws"] * 3
    # the same close again (renewal overlap, duplicated frame) is dropped
    assert tr.on_closed(bars[1], now=0.0) == []
    # a different value for a released minute is a revision: passed on for the pipeline
    revised = attrs.evolve(bars[1], close=Decimal("101"), high=Decimal("101"))
    assert times(tr.on_closed(revised, now=0.0)) == [T0 + 60]
    assert not tr.wants_fill()


def test_a_close_above_a_hole_is_held_until_rest_fills_it() -> None:
    tr = tracker()
    bars = minutes(T0, 4)
    assert times(tr.on_closed(bars[0], now=0.0)) == [T0]
    # minutes 1 and 2 never came; minute 3 is held
    assert tr.on_closed(bars[3], now=5.0) == []
    since = tr.held_since
    assert tr.held_count() == 1 and since == 5.0
    request = tr.next_fill(now=5.0)
    # up to the held minute: REST returning it too would prove any minute it lacks below
    assert request == FillRequest(T0 + 60, T0 + 240, "hole")
    assert tr.next_fill(now=5.0) is None  # one fill in flight per series
    out = tr.on_fill_result(request, bars[1:], now=6.0)
    assert times(out) == [T0 + 60, T0 + 120, T0 + 180]
    assert [r.source for r in out] == ["rest", "rest", "ws"]
    assert [r.reason for r in out] == ["hole", "hole", None]  # repairs (a metric counts them)
    assert tr.head == T0 + 180 and tr.held_count() == 0 and tr.held_since is None


def test_rest_confirming_a_hole_releases_the_held_candles() -> None:
    """An exchange-side hole: REST has nothing, the held candles go on, the hole stays."""
    tr = tracker()
    bars = minutes(T0, 6)
    tr.on_closed(bars[0], now=0.0)
    tr.on_closed(bars[4], now=0.0)
    tr.on_closed(bars[5], now=0.0)
    request = tr.next_fill(now=0.0)
    assert request == FillRequest(T0 + 60, T0 + 360, "hole")
    # REST has minute 2 and the held ones (1 and 3 are missing at the exchange)
    out = tr.on_fill_result(request, [bars[2], bars[4], bars[5]], now=0.0)
    assert times(out) == [T0 + 120, T0 + 240, T0 + 300]
    assert tr.head == T0 + 300 and not tr.wants_fill()
    assert tr.absent_minutes == 2
    # the runs confirmed absent, for the store's gap events, taken once
    assert tr.take_absent() == ((T0 + 60, T0 + 120), (T0 + 180, T0 + 240))
    assert tr.take_absent() == ()


def test_minutes_before_an_empty_stores_first_bar_are_not_a_hole() -> None:
    """The symbol's history starts after the initial backfill window begins: the minutes
    before its first bar are no hole (not counted, no gap); those after are."""
    tr = tracker(head=None, initial=10)
    tr.on_live_frame(T0 + 600, new_connection=True)
    request = tr.next_fill(now=0.0)
    assert request == FillRequest(T0, T0 + 600, "initial")
    listed = minutes(T0 + 300, 5)
    out = tr.on_fill_result(request, listed[:2] + listed[3:], now=0.0)
    assert times(out) == [T0 + 300, T0 + 360, T0 + 480, T0 + 540]
    assert tr.absent_minutes == 1
    assert tr.take_absent() == ((T0 + 420, T0 + 480),)


@pytest.mark.parametrize(
    ("listing_at", "listing"),
    [(T0 + 300, T0 + 300), (None, None), (T0 + 360, None)],
    ids=["rest-says-first", "rest-cannot-say-or-has-earlier", "another-minute"],
)
def test_an_empty_stores_first_minute_is_its_listing_only_when_rest_says_so(
    listing_at: int | None, listing: int | None
) -> None:
    """The backfill found nothing before T0+300: a listing when REST said that minute is
    the series' first at Binance (the loop asks), else a late start."""
    tr = tracker(head=None, initial=10)
    tr.on_live_frame(T0 + 600, new_connection=True)
    request = tr.next_fill(now=0.0)
    assert request is not None and tr.before_history
    tr.on_fill_result(request, minutes(T0 + 300, 5), now=0.0, listing_at=listing_at)
    assert tr.listing == listing and not tr.before_history


def test_late_close_is_decided_by_exchange_time_never_wall_clock() -> None:
    tr = tracker()
    bar0 = minutes(T0, 1)[0]
    tr.on_closed(bar0, now=0.0)
    # minute 1 ends at T0+120 s; its close is late at T0+130 s of *exchange* time
    tr.on_exchange_time((T0 + 129) * 1000 + 999)
    assert tr.next_fill(now=1e9) is None  # any amount of wall-clock time changes nothing
    tr.on_exchange_time((T0 + 130) * 1000)
    assert tr.next_fill(now=0.0) == FillRequest(T0 + 60, T0 + 120, "late_close")


def test_empty_store_fetches_initial_history_before_the_first_live_minute() -> None:
    tr = tracker(head=None, initial=5)
    first = T0 + 600
    tr.on_live_frame(first, new_connection=True)
    request = tr.next_fill(now=0.0)
    assert request == FillRequest(first - 300, first, "initial")
    live = minutes(first, 1)[0]
    assert tr.on_closed(live, now=0.0) == []  # held until the history is in
    history = minutes(first - 300, 5)
    out = tr.on_fill_result(request, history, now=0.0)
    assert times(out) == [first - 300 + 60 * i for i in range(6)]


def test_reconnect_backfills_from_the_head_to_the_first_live_frame() -> None:
    tr = tracker(head=T0)
    tr.on_live_frame(T0 + 60, new_connection=False)
    assert not tr.wants_fill()
    tr.on_live_frame(T0 + 3600, new_connection=True)
    assert tr.next_fill(now=0.0) == FillRequest(T0 + 60, T0 + 3600, "reconnect")


def test_long_outages_are_fetched_in_chunks() -> None:
    tr = tracker(head=T0)
    end = T0 + 60 * (FILL_CHUNK_MINUTES * 2 + 10)
    tr.on_live_frame(end, new_connection=True)
    tr.on_exchange_time(end * 1000 + 500)
    first = tr.next_fill(now=0.0)
    assert first is not None and first.end - first.start == FILL_CHUNK_MINUTES * 60
    tr.on_fill_result(first, [], now=0.0)
    second = tr.next_fill(now=0.0)
    assert second is not None and second.start == first.end


def test_a_minute_rest_does_not_have_yet_is_not_called_absent_until_it_is_late() -> None:
    """Reconnect half a second into a minute: the minute that just closed may not be in
    REST yet, and no live close will come for it on the new connection."""
    live = T0 + 600
    tr, request = reconnected(live, 500)
    bars = minutes(T0 + 60, 9)  # T0+60 .. T0+540; REST lags on the last one
    out = tr.on_fill_result(request, bars[:-1], now=0.0)
    assert times(out) == [T0 + 60 * i for i in range(1, 9)]
    assert tr.head == T0 + 480  # T0+540 is not skipped as an exchange hole
    assert tr.next_fill(now=0.0) is None  # and REST is not hammered while it is recent
    tr.on_exchange_time((T0 + 609) * 1000 + 999)
    assert tr.next_fill(now=0.0) is None
    # late_close after its end, in exchange time, it is asked for again
    tr.on_exchange_time((T0 + 610) * 1000)
    again = tr.next_fill(now=0.0)
    assert again is not None and again.start == T0 + 540
    # the live close of the forming minute is held above it meanwhile
    assert tr.on_closed(minutes(live, 1)[0], now=0.0) == []
    out = tr.on_fill_result(again, bars[-1:], now=0.0)
    assert times(out) == [T0 + 540, live]
    assert not tr.wants_fill()


def test_a_minute_still_missing_once_late_is_an_exchange_hole() -> None:
    live = T0 + 300
    tr, request = reconnected(live, 200)
    bars = minutes(T0 + 60, 4)
    # minute T0+120 is missing below one REST returned: absent, whatever its age
    tr.on_fill_result(request, [bars[0], bars[2]], now=0.0)
    assert tr.head == T0 + 180
    tr.on_exchange_time((live + 10) * 1000)
    again = tr.next_fill(now=0.0)
    assert again == FillRequest(T0 + 240, live, "reconnect")
    assert tr.on_fill_result(again, [], now=0.0) == []
    assert tr.head == live - 60 and not tr.wants_fill()


@pytest.mark.parametrize("rest_has_it", [True, False])
def test_a_minute_called_absent_on_time_alone_is_asked_for_once_more(rest_has_it: bool) -> None:
    """REST lagging longer than late_close: the minute it lacks is called absent on
    exchange time alone (a gap), and asked for once more REST_LAG_MAX_MS after its end;
    what REST has by then is released below the head (a backfill)."""
    live = T0 + 300
    tr, request = reconnected(live, 200)
    lagged = minutes(T0 + 240, 1)[0]
    tr.on_fill_result(request, minutes(T0 + 60, 3), now=0.0)
    tr.on_exchange_time((live + 10) * 1000)
    again = tr.next_fill(now=0.0)
    assert again == FillRequest(T0 + 240, live, "reconnect")
    assert tr.on_fill_result(again, [], now=0.0) == []
    assert tr.take_absent() == ((T0 + 240, live),) and tr.absent_minutes == 1
    # the live close goes on meanwhile
    for bar in minutes(live, 1):
        tr.on_exchange_time((bar.candle_time + 60) * 1000 + 100)
        assert times(tr.on_closed(bar, now=0.0)) == [bar.candle_time]
    tr.on_exchange_time(live * 1000 + REST_LAG_MAX_MS - 1)
    assert tr.next_fill(now=0.0) is None
    tr.on_exchange_time(live * 1000 + REST_LAG_MAX_MS)
    recheck = tr.next_fill(now=0.0)
    assert recheck == FillRequest(T0 + 240, live, "recheck")
    out = tr.on_fill_result(recheck, [lagged] if rest_has_it else [], now=0.0)
    assert [(r.candle, r.source, r.reason) for r in out] == (
        [(lagged, "rest", "recheck")] if rest_has_it else []
    )
    # asked once: nothing more to fetch, nothing counted twice
    assert not tr.wants_fill() and tr.absent_minutes == 1 and tr.take_absent() == ()


def test_a_late_close_of_a_minute_called_absent_takes_it_out_of_its_recheck() -> None:
    """The recheck asks only for the minutes still missing: one whose close came late
    below the head is not released again (after _recent forgot it)."""
    live = T0 + 300
    tr, request = reconnected(live, 200)
    tr.on_fill_result(request, minutes(T0 + 60, 2), now=0.0)  # REST lags on 180 and 240
    tr.on_exchange_time((live + 10) * 1000)
    again = tr.next_fill(now=0.0)
    assert again is not None and tr.on_fill_result(again, [], now=0.0) == []
    assert tr.take_absent() == ((T0 + 180, T0 + 240), (T0 + 240, live))
    late = minutes(T0 + 180, 1)[0]
    assert times(tr.on_closed(late, now=0.0)) == [T0 + 180]  # its close, late: stored
    for bar in minutes(live, RECENT_KEEP + 1):  # the live minutes go on; _recent forgets it
        tr.on_exchange_time((bar.candle_time + 60) * 1000)
        tr.on_closed(bar, now=0.0)
    recheck = tr.next_fill(now=0.0)
    assert recheck == FillRequest(T0 + 240, live, "recheck")
    out = tr.on_fill_result(recheck, minutes(T0 + 180, 2), now=0.0)
    assert times(out) == [T0 + 240]
    assert not tr.wants_fill()


def test_a_restart_rechecks_the_minutes_missing_just_below_the_head() -> None:
    """Rechecks die with the process: after a restart, minutes missing among the stored
    ones within RECHECK_AT_START_S below the head are asked for once more when due; an
    unresolved hole is retried instead, and older holes are not asked for again."""
    head = T0 + 600
    gone = (3, 6, 8, 9)  # minute 3 lies below the window (head - 360 s)
    stored = [T0 + 60 * i for i in range(11) if i not in gone]
    tr = SeriesTracker(
        head=head,
        initial_backfill=0,
        late_close_ms=LATE_MS,
        unresolved=[(T0 + 360, T0 + 420)],
        stored=stored,
    )
    tr.on_exchange_time((head + 60) * 1000 + LATE_MS - 1)  # the live stream at the head
    tr.on_exchange_time(head * 1000 + REST_LAG_MAX_MS - 1)
    retry = tr.next_fill(now=0.0)
    assert retry == FillRequest(T0 + 360, T0 + 420, "retry")
    assert times(tr.on_fill_result(retry, minutes(T0 + 360, 1), now=0.0)) == [T0 + 360]
    assert tr.next_fill(now=0.0) is None  # not due: REST may still lag on minute 9
    tr.on_exchange_time(head * 1000 + REST_LAG_MAX_MS)
    recheck = tr.next_fill(now=0.0)
    assert recheck == FillRequest(T0 + 480, T0 + 600, "recheck")
    found = minutes(T0 + 540, 1)  # REST has minute 9 now, not minute 8
    out = tr.on_fill_result(recheck, found, now=0.0)
    assert [(r.candle, r.source, r.reason) for r in out] == [(found[0], "rest", "recheck")]
    assert not tr.wants_fill() and tr.head == head


def test_a_failed_fill_is_retried_after_its_pause() -> None:
    tr = tracker()
    bars = minutes(T0, 3)
    tr.on_closed(bars[0], now=0.0)
    tr.on_closed(bars[2], now=0.0)
    request = tr.next_fill(now=0.0)
    assert request is not None
    tr.on_fill_failed(request, now=10.0, retry_after_s=2.0)
    assert tr.failures == 1
    assert tr.next_fill(now=11.9) is None
    assert tr.next_fill(now=12.0) == request


def test_the_live_close_wins_over_rest_when_it_arrives_during_the_fill() -> None:
    tr = tracker()
    bars = minutes(T0, 3)
    tr.on_closed(bars[0], now=0.0)
    tr.on_exchange_time((T0 + 130) * 1000)
    request = tr.next_fill(now=0.0)
    assert request == FillRequest(T0 + 60, T0 + 120, "late_close")
    assert times(tr.on_closed(bars[1], now=0.0)) == [T0 + 60]  # arrived meanwhile
    assert tr.on_fill_result(request, [bars[1]], now=0.0) == []


def test_release_held_keeps_the_hole_for_a_later_retry() -> None:
    tr = tracker()
    bars = minutes(T0, 4)
    tr.on_closed(bars[0], now=0.0)
    tr.on_closed(bars[3], now=0.0)
    request = tr.next_fill(now=0.0)
    assert request is not None
    tr.on_fill_failed(request, now=0.0, retry_after_s=0.0)
    assert times(tr.release_held()) == [T0 + 180]
    assert tr.head == T0 + 180
    retry = tr.next_fill(now=1.0)
    assert retry == FillRequest(T0 + 60, T0 + 180, "retry")
    out = tr.on_fill_result(retry, bars[1:3], now=1.0)
    assert times(out) == [T0 + 60, T0 + 120]  # below the head: the pipeline backfills
    assert not tr.wants_fill()


def test_a_retry_keeps_the_minutes_rest_may_only_be_behind_on() -> None:
    """REST answering a retry without a minute that ended less than late_close ago has
    not confirmed it absent: the range stays unresolved and is asked for again once that
    minute is late (else a minute the exchange has would be dropped for good)."""
    tr = SeriesTracker(head=T0 - 60, initial_backfill=0, late_close_ms=120_000)
    bars = minutes(T0, 3)
    tr.on_closed(bars[0], now=0.0)
    tr.on_closed(bars[2], now=0.0)  # exchange time: T0 + 180 s
    request = tr.next_fill(now=0.0)
    assert request is not None
    tr.on_fill_failed(request, now=0.0, retry_after_s=0.0)
    assert times(tr.release_held()) == [T0 + 120]
    retry = tr.next_fill(now=0.0)
    assert retry == FillRequest(T0 + 60, T0 + 120, "retry")
    assert tr.on_fill_result(retry, [], now=0.0) == []  # REST is behind
    assert tr.unresolved == ((T0 + 60, T0 + 120),)
    assert tr.absent_minutes == 0
    assert not tr.wants_fill() and tr.next_fill(now=1.0) is None  # no hammering
    tr.on_exchange_time((T0 + 120) * 1000 + 119_999)
    assert not tr.wants_fill()
    tr.on_exchange_time((T0 + 120) * 1000 + 120_000)  # the minute is late now
    again = tr.next_fill(now=1.0)
    assert again == retry
    assert times(tr.on_fill_result(again, bars[1:2], now=1.0)) == [T0 + 60]
    assert list(tr.unresolved) == []
    assert not tr.wants_fill()


def test_a_retry_confirms_absent_minutes_once_they_are_old_enough() -> None:
    tr = SeriesTracker(
        head=T0 + 300, initial_backfill=0, late_close_ms=LATE_MS, unresolved=[(T0, T0 + 300)]
    )
    tr.on_exchange_time((T0 + 400) * 1000)
    retry = tr.next_fill(now=0.0)
    assert retry == FillRequest(T0, T0 + 300, "retry")
    bars = minutes(T0, 5)
    # minutes 1 and 3 are missing, below a returned one or old enough: absent for good
    out = tr.on_fill_result(retry, [bars[0], bars[2], bars[4]], now=0.0)
    assert times(out) == [T0, T0 + 120, T0 + 240]
    assert tr.absent_minutes == 2
    assert tr.unresolved == () and not tr.wants_fill()
    assert tr.take_absent() == ((T0 + 60, T0 + 120), (T0 + 180, T0 + 240))


def test_long_retries_are_fetched_in_bounded_chunks() -> None:
    end = T0 + (FILL_CHUNK_MINUTES + 5) * 60
    tr = SeriesTracker(head=end, initial_backfill=0, late_close_ms=LATE_MS, unresolved=[(T0, end)])
    tr.on_exchange_time((end + 60) * 1000 + LATE_MS)  # the live stream is at the head
    first = tr.next_fill(now=0.0)
    middle = T0 + FILL_CHUNK_MINUTES * 60
    assert first == FillRequest(T0, middle, "retry")
    assert first.minutes == FILL_CHUNK_MINUTES
    assert len(tr.on_fill_result(first, minutes(T0, FILL_CHUNK_MINUTES), now=0.0)) == (
        FILL_CHUNK_MINUTES
    )
    assert tr.unresolved == ((middle, end),)
    second = tr.next_fill(now=0.0)
    assert second == FillRequest(middle, end, "retry")
    assert times(tr.on_fill_result(second, minutes(middle, 5), now=0.0)) == [
        middle + 60 * i for i in range(5)
    ]
    assert not tr.unresolved


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=40),
    lost=st.sets(st.integers(min_value=0, max_value=39)),
    doubled=st.sets(st.integers(min_value=0, max_value=39)),
    exchange_holes=st.sets(st.integers(min_value=0, max_value=39)),
)
def test_any_arrival_pattern_releases_every_existing_minute_once_in_order(
    count: int, lost: set[int], doubled: set[int], exchange_holes: set[int]
) -> None:
    truth = {c.candle_time: c for i, c in enumerate(minutes(T0, count)) if i not in exchange_holes}
    tr = tracker()
    out: list[Released] = []

    def serve_fills() -> None:
        while (request := tr.next_fill(now=0.0)) is not None:
            rest = [c for t, c in truth.items() if request.start <= t < request.end]
            out.extend(tr.on_fill_result(request, rest, now=0.0))

    for i in range(count):
        t = T0 + 60 * i
        tr.on_exchange_time((t + 15) * 1000)
        serve_fills()
        if t in truth and i not in lost:
            for _ in range(2 if i in doubled else 1):
                out.extend(tr.on_closed(truth[t], now=0.0))
        serve_fills()
    # exchange time moves on past the last minute's deadline
    tr.on_exchange_time((T0 + 60 * count + 11) * 1000)
    serve_fills()
    assert times(out) == sorted(truth)
    assert tr.held_count() == 0


@settings(max_examples=200, deadline=None)
@given(
    count=st.integers(min_value=1, max_value=30),
    lost=st.sets(st.integers(min_value=0, max_value=29)),
    exchange_holes=st.sets(st.integers(min_value=0, max_value=29)),
    rest_down=st.sets(st.integers(min_value=0, max_value=29)),
    back_at_once=st.booleans(),
    lag_s=st.integers(min_value=0, max_value=115),
)
def test_rest_outages_and_a_lagging_rest_lose_no_minute(
    count: int,
    lost: set[int],
    exchange_holes: set[int],
    rest_down: set[int],
    back_at_once: bool,
    lag_s: int,
) -> None:
    """REST down at some minutes (held candles then committed over the hole and retried)
    and REST lagging the exchange by up to late_close: every minute the exchange has is
    released exactly once, and none it has is confirmed absent."""
    late_ms = 120_000
    truth = {c.candle_time: c for i, c in enumerate(minutes(T0, count)) if i not in exchange_holes}
    tr = SeriesTracker(head=T0 - 60, initial_backfill=0, late_close_ms=late_ms)
    out: list[Released] = []
    exchange_ms = T0 * 1000

    def serve_fills(up: bool) -> None:
        while (request := tr.next_fill(now=0.0)) is not None:
            if not up:
                tr.on_fill_failed(request, now=0.0, retry_after_s=0.0)
                return
            known = [
                c
                for t, c in truth.items()
                if request.start <= t < request.end and (t + 60 + lag_s) * 1000 <= exchange_ms
            ]
            out.extend(tr.on_fill_result(request, known, now=0.0))

    for i in range(count):
        t = T0 + 60 * i
        exchange_ms = (t + 60) * 1000 + 500
        tr.on_exchange_time(exchange_ms)
        if t in truth and i not in lost:
            out.extend(tr.on_closed(truth[t], now=0.0))
        serve_fills(up=i not in rest_down)
        if i in rest_down:
            out.extend(tr.release_held())  # hold_max_s passed with REST down
            if back_at_once:  # REST answers the retry at once, still behind the exchange
                serve_fills(up=True)
    for step in range(1, 5):  # exchange time moves on; REST is back
        exchange_ms = (T0 + 60 * count) * 1000 + step * late_ms
        tr.on_exchange_time(exchange_ms)
        serve_fills(up=True)
    released = times(out)
    assert sorted(released) == sorted(truth)
    assert len(released) == len(set(released))
    assert tr.held_count() == 0 and tr.unresolved == ()
    # absent: the exchange holes, and the minutes after the data whose time has passed
    late_upto = (exchange_ms - late_ms) // 60_000 * 60
    assert tr.absent_minutes == sum(t not in truth for t in range(T0, late_upto, 60))
    # and each of them is reported once, in a run, for the store's gap events
    runs = tr.take_absent()
    reported = [t for start, end in runs for t in range(start, end, 60)]
    assert sorted(reported) == [t for t in range(T0, late_upto, 60) if t not in truth]


@settings(max_examples=100, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8)), max_size=6),
    removed=st.lists(st.tuples(st.integers(0, 40), st.integers(1, 8)), max_size=6),
)
def test_subtract_ranges_keeps_exactly_the_minutes_not_removed(
    ranges: list[tuple[int, int]], removed: list[tuple[int, int]]
) -> None:
    def as_ranges(pairs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return [(T0 + 60 * a, T0 + 60 * (a + n)) for a, n in pairs]

    def minutes_of(rs: Sequence[tuple[int, int]]) -> list[int]:
        return [t for start, end in rs for t in range(start, end, 60)]

    kept, cut = as_ranges(ranges), as_ranges(removed)
    result = subtract_ranges(kept, cut)
    assert all(start < end for start, end in result)
    gone = set(minutes_of(cut))
    # the order of ``ranges`` is kept, each range's remainder ascending
    assert minutes_of(result) == [t for t in minutes_of(kept) if t not in gone]
