"""What subscribers are owed before a forming candle, and when a batch is due (pure).

FormingGate and group_settled directly, then the rules through IngestCore (tests/ingest/
driver.py plays the shell): a forming candle of bar t never reaches the hub before a closed
candle of its series below t that is published later — base and derived, across initial
backfill, held closes, late closes, exchange holes and the throttle — and the steady-state
flush rule. Hypothesis drives random frame sequences for the rule that holds for all inputs.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ingest.driver import (
    BTC,
    ETH,
    LATE_S,
    T0,
    Driver,
    Sent,
    bar,
    close_of,
    forming_of,
    kline,
    make_core,
    overtaken,
    truth_of,
)
from tradecanvas.ingest.batcher import BatchItem
from tradecanvas.ingest.ordering import FormingGate, group_settled
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.tracker import FillRequest
from tradecanvas.model import Candle, SeriesId

SOL = SeriesId.parse("binance:futures:SOL/USDT:1m")
BTC_1M, BTC_5M = str(BTC), "binance:futures:BTC/USDT:5m"


def kinds(driver: Driver, series_id: str = BTC_1M) -> list[tuple[str, int]]:
    return [(s.kind, s.time) for s in driver.sent if s.series_id == series_id]


# --- FormingGate and group_settled ---------------------------------------------------------


def test_the_gate_holds_the_newest_forming_candle_while_anything_is_owed() -> None:
    gate = FormingGate()
    assert gate.allows(BTC, T0, T0 - 60)
    assert not gate.allows(BTC, T0, T0 - 120)  # the minute before is not settled
    assert not gate.allows(BTC, T0, None)
    gate.owe(BTC, 2)
    assert not gate.allows(BTC, T0, T0 - 60) and gate.allows(ETH, T0, T0 - 60)
    gate.hold(BTC, bar(T0, 100))
    gate.hold(BTC, bar(T0, 101))
    gate.hold(BTC, bar(T0 - 60, 99))  # an older bar never replaces a newer one
    assert gate.held(BTC) == bar(T0, 101) and len(gate) == 1
    gate.settle(BTC)
    assert gate.release({BTC: T0 - 60}) == []  # one entry still owed
    gate.settle(BTC)
    assert gate.release({BTC: T0 - 60}) == [(BTC, bar(T0, 101))]
    assert len(gate) == 0
    gate.settle(BTC)  # more than was owed (a commit the core did not queue): no debt
    assert not gate.owes(BTC)


def test_a_held_forming_candle_whose_bar_closed_is_dropped() -> None:
    gate = FormingGate()
    gate.hold(BTC, bar(T0))
    gate.drop(BTC, T0 - 60)
    assert gate.held(BTC) is not None
    assert gate.release({BTC: T0}) == [] and gate.held(BTC) is None  # its close is in
    gate.hold(BTC, bar(T0))
    gate.drop(BTC, T0)
    assert gate.held(BTC) is None


def test_a_group_is_settled_when_no_live_series_still_owes_the_newest_minute() -> None:
    assert group_settled({}, {})
    assert group_settled({BTC: None}, {})
    # ETH sent frames of the newest minute but has not closed it: wait for it
    assert not group_settled({BTC: T0, ETH: T0 - 60}, {BTC: T0, ETH: T0})
    assert group_settled({BTC: T0, ETH: T0}, {BTC: T0, ETH: T0 + 60})
    # a quiet series (no frame of that minute) or one not seen yet is not waited for
    assert group_settled({BTC: T0, ETH: T0 - 600}, {BTC: T0, ETH: T0 - 600})
    assert group_settled({BTC: T0, ETH: None}, {BTC: T0})
    assert not group_settled({BTC: T0, ETH: None}, {BTC: T0, ETH: T0})


# --- the rules through IngestCore ----------------------------------------------------------


def test_a_forming_candle_waits_for_the_commit_of_the_close_before_it() -> None:
    """At a minute boundary the next bar's first update can arrive while the close before
    it waits for its commit: it is held, and goes out right after that close is published."""
    driver = Driver(make_core(), {BTC: {}})
    driver.send(close_of(BTC, bar(T0)))
    outcome = driver.send(forming_of(BTC, bar(T0 + 60), 100))
    assert outcome.forming == () and driver.core.gate.held(BTC) == bar(T0 + 60)
    newer = bar(T0 + 60, 101)
    driver.send(forming_of(BTC, newer, 200))  # replaces the held one
    assert kinds(driver) == []
    driver.commit()
    assert kinds(driver) == [("closed", T0), ("forming", T0 + 60)]
    assert driver.forming[0] == (BTC_1M, newer)
    # nothing owed any more: the next update goes out at once
    assert driver.send(forming_of(BTC, bar(T0 + 60, 102), 300)).forming != ()


def test_a_batch_in_flight_is_owed_too() -> None:
    driver = Driver(make_core(), {BTC: {}})
    driver.send(close_of(BTC, bar(T0)))
    items = driver.take()
    assert items is not None and driver.core.queued == 0
    driver.send(forming_of(BTC, bar(T0 + 60), 100))  # the commit runs: held
    assert kinds(driver) == []
    driver.finish(items)
    assert kinds(driver) == [("closed", T0), ("forming", T0 + 60)]


def test_forming_updates_wait_for_the_start_up_backfill() -> None:
    """A subscriber joining during the start-up backfill must not get the live bar before
    the history under it."""
    truth = truth_of(10)
    driver = Driver(make_core(head=None, initial_backfill_candles="5"), {BTC: truth})
    rows = list(truth.values())
    driver.send(forming_of(BTC, rows[5], 1_000))
    driver.send(forming_of(BTC, rows[5], 2_000))
    assert driver.fills == [FillRequest(T0, T0 + 300, "initial")] and kinds(driver) == []
    driver.answer()
    assert kinds(driver) == []  # the history is queued, not yet published
    driver.commit()
    assert kinds(driver) == [("closed", T0 + 60 * i) for i in range(5)] + [("forming", T0 + 300)]


def test_a_late_close_holds_the_next_bar_until_rest_repaired_it() -> None:
    truth = truth_of(3)
    driver = Driver(make_core(), {BTC: truth})
    driver.send(forming_of(BTC, truth[T0], 30_000))
    # T0's close never comes; T0+60 forms meanwhile
    driver.send(forming_of(BTC, truth[T0 + 60], 5_000))
    driver.send(forming_of(BTC, truth[T0 + 60], LATE_S * 1000))  # T0's close is late now
    assert driver.fills == [FillRequest(T0, T0 + 60, "late_close")]
    assert kinds(driver) == [("forming", T0)]
    driver.answer()
    driver.commit()
    assert kinds(driver) == [("forming", T0), ("closed", T0), ("forming", T0 + 60)]
    assert [c for s, c in driver.forming if s == BTC_1M][-1] == truth[T0 + 60]


def test_a_held_forming_candle_is_dropped_when_its_own_close_arrives() -> None:
    truth = truth_of(3)
    driver = Driver(make_core(), {BTC: truth})
    driver.send(forming_of(BTC, truth[T0 + 60], 5_000))  # T0's close has not come
    driver.send(close_of(BTC, truth[T0 + 60]))  # held above the hole, and its bar is over
    assert driver.core.gate.held(BTC) is None
    driver.answer()
    driver.commit()
    assert kinds(driver) == [("closed", T0), ("closed", T0 + 60)]


def test_closes_held_above_a_hole_hold_the_forming_candles_above_them() -> None:
    truth = truth_of(8)
    driver = Driver(make_core(), {BTC: truth})
    rows = list(truth.values())
    driver.send(close_of(BTC, rows[0]))
    driver.commit()
    # a reconnect: minutes 1..3 were lost, 4 closes on the new connection, 5 forms
    driver.send(close_of(BTC, rows[4]), generation=2)
    driver.send(forming_of(BTC, rows[5]), generation=2)
    assert kinds(driver) == [("closed", T0)]
    driver.answer()
    driver.commit()
    assert kinds(driver) == [("closed", T0 + 60 * i) for i in range(5)] + [("forming", T0 + 300)]
    assert overtaken(driver.sent) == []


def test_the_closed_5m_bar_before_an_exchange_hole_precedes_the_next_bars_forming() -> None:
    """Minutes 3 and 4 of the first bucket are missing at the exchange and nothing is
    streamed for them; once exchange time makes them late, REST confirms them absent: that
    run is committed on its own — the pipeline finalises the incomplete 5m bar with it —
    before any forming update of the next bucket (1m or 5m) goes out."""
    truth = truth_of(10, missing=(3, 4))
    driver = Driver(make_core(), {BTC: truth})
    for t in (T0, T0 + 60, T0 + 120):
        driver.send(close_of(BTC, truth[t]))
        driver.commit()
    # the exchange is back: minute 5 forms, late enough that 3 and 4 are late too
    driver.send(forming_of(BTC, truth[T0 + 300], LATE_S * 1000))
    assert ("forming", T0 + 300) not in kinds(driver) + kinds(driver, BTC_5M)
    driver.answer()
    assert driver.core.queued == 1  # the absent run, alone
    driver.commit()
    assert driver.absent_runs() == [(T0 + 180, T0 + 300)]
    assert kinds(driver, BTC_5M)[-2:] == [("closed", T0), ("forming", T0 + 300)]
    assert kinds(driver)[-1] == ("forming", T0 + 300)
    assert overtaken(driver.sent) == []


def test_a_throttled_forming_update_that_falls_due_behind_a_queued_close_is_held() -> None:
    core = make_core(market_forming_min_interval_ms="250")
    driver = Driver(core, {BTC: {}})
    driver.send(forming_of(BTC, bar(T0 + 60), 1_000))  # goes out (nothing owed)
    driver.now = 0.1
    driver.send(forming_of(BTC, bar(T0 + 60, 101), 2_000))  # throttled: pending
    driver.send(close_of(BTC, bar(T0)))  # a revision below: queued, owed
    driver.now = 0.3
    assert core.due_forming(driver.now) == [] and core.gate.held(BTC) == bar(T0 + 60, 101)
    driver.commit()
    assert kinds(driver)[-2:] == [("closed", T0), ("forming", T0 + 60)]


# --- flushes -----------------------------------------------------------------------------


def test_a_close_is_due_at_once_when_nothing_else_is_pending() -> None:
    core = make_core(binance_ws_flush_s="60")
    driver = Driver(core, {BTC: {}})
    driver.send(close_of(BTC, bar(T0)))
    assert core.batch_due_at() == -math.inf


def test_group_commit_the_closes_queued_during_a_commit_are_the_next_group() -> None:
    """flush_s 0 (the default): whatever is queued when the committer is idle goes at once,
    the other live series' closes of the minute not waited for; a forming bar of the next
    minute still waits for its series' close."""
    core = make_core([BTC, ETH, SOL])
    driver = Driver(core, {})
    for sid in (BTC, ETH, SOL):
        driver.send(forming_of(sid, bar(T0), 50_000))
    driver.send(close_of(BTC, bar(T0)))
    assert core.batch_due_at() == -math.inf  # ETH and SOL are not waited for
    first = driver.take()
    assert first is not None and [i.series for i in first] == [BTC]
    driver.send(close_of(ETH, bar(T0)))  # during the commit: the next group
    driver.send(close_of(SOL, bar(T0)))
    driver.send(forming_of(ETH, bar(T0 + 60), 60_000))  # its close is owed: held
    assert core.queued == 2
    driver.finish(first)
    second = driver.take()
    assert second is not None and [i.series for i in second] == [ETH, SOL]
    assert [s.kind for s in driver.sent if s.series_id == str(ETH)] == ["forming"]
    driver.finish(second)
    assert kinds(driver, str(ETH)) == [("forming", T0), ("closed", T0), ("forming", T0 + 60)]
    assert overtaken(driver.sent) == []


def test_the_closes_of_a_minute_commit_together_when_they_arrive_together() -> None:
    """A close waits for the other live series' closes of its minute, at most flush_s."""
    core = make_core([BTC, ETH, SOL], binance_ws_flush_s="0.5")
    driver = Driver(core, {})
    for sid in (BTC, ETH, SOL):
        driver.send(forming_of(sid, bar(T0), 50_000))
    driver.send(close_of(BTC, bar(T0)))
    assert core.batch_due_at() == 0.5  # ETH and SOL are expected to close T0 too
    driver.now = 0.01
    driver.send(close_of(ETH, bar(T0)))
    assert core.batch_due_at() == 0.5
    driver.send(close_of(SOL, bar(T0)))
    assert core.batch_due_at() == -math.inf
    driver.commit_due()
    assert len(driver.committed) == 3
    assert [s.series_id for s in driver.sent if s.kind == "closed"][:3] == [
        str(BTC),
        str(ETH),
        str(SOL),
    ]


def test_a_close_waits_for_a_late_series_no_longer_than_flush_s() -> None:
    core = make_core([BTC, ETH], binance_ws_flush_s="0.5")
    driver = Driver(core, {BTC: {}, ETH: {}})
    driver.send(forming_of(ETH, bar(T0), 50_000))
    driver.send(close_of(BTC, bar(T0)))
    driver.commit_due()
    assert driver.committed == []
    driver.now = 0.5
    driver.commit_due()
    assert driver.times(BTC) == [T0]
    # a quiet series (no frame of the newest minute) is not waited for at all
    driver.send(close_of(BTC, bar(T0 + 60)))
    assert core.batch_due_at() == -math.inf


def test_a_full_batch_is_due_whatever_the_group() -> None:
    core = make_core([BTC, ETH], binance_ws_batch_max="2", binance_ws_flush_s="60")
    driver = Driver(core, {BTC: {}, ETH: {}})
    driver.send(forming_of(ETH, bar(T0 + 60), 50_000))
    driver.send(close_of(BTC, bar(T0)))
    assert core.batch_due_at() == 60.0
    driver.send(close_of(BTC, bar(T0 + 60)))
    assert core.batch_due_at() == -math.inf


def test_a_rest_repaired_close_and_the_live_closes_held_above_it_are_due_at_once() -> None:
    """The repair and everything it released commit right after REST answered, whatever
    flush_s says (so they reach subscribers within a commit's time of being stored)."""
    truth = truth_of(5)
    core = make_core(binance_ws_flush_s="60")
    driver = Driver(core, {BTC: truth})
    driver.send(forming_of(BTC, truth[T0], 30_000))  # T0's close is omitted
    for t in (T0 + 60, T0 + 120):
        driver.send(close_of(BTC, truth[t]))  # held above it
    # asked up to the close held when it started
    assert driver.fills == [FillRequest(T0, T0 + 120, "late_close")]
    driver.answer()
    assert core.batch_due_at() == -math.inf
    driver.commit_due()
    assert driver.times() == [T0, T0 + 60, T0 + 120]
    driver.send(close_of(BTC, truth[T0 + 180]))  # the next live close: at once as well
    assert core.batch_due_at() == -math.inf


# --- any frame sequence --------------------------------------------------------------------


@st.composite
def streams(
    draw: st.DrawFn, sid: SeriesId, count: int
) -> tuple[dict[int, Candle], list[tuple[int, str]]]:
    """A truth of ``count`` minutes (some missing at the exchange, nothing streamed for
    them) and the frames Binance sends for it with the exchange time each was sent at:
    several forming updates per minute (any time in it), closes — some never sent, some
    repeated, some late."""
    indices = st.sets(st.integers(0, count - 1), max_size=count)
    lost, repeated = draw(indices), draw(indices)
    # exchange holes are runs of minutes (maintenance), often at the end of a 5m bucket
    runs = draw(st.lists(st.tuples(st.integers(0, count - 1), st.integers(1, 4)), max_size=2))
    missing = {i for start, length in runs for i in range(start, start + length)}
    late = draw(st.dictionaries(st.integers(0, count - 1), st.integers(1, 150_000), max_size=5))
    truth = truth_of(count, missing)
    frames: list[tuple[int, str]] = []
    for i, (t, candle) in enumerate(truth.items()):
        for into_ms in draw(st.lists(st.integers(0, 59_999), max_size=3)):
            frames.append((t * 1000 + into_ms, forming_of(sid, candle, into_ms)))
        if i in lost:
            continue
        sent_ms = (t + 60) * 1000 + late.get(i, 0)
        frames.append((sent_ms, close_of(sid, candle, late.get(i, 0))))
        if i in repeated:
            frames.append((sent_ms + 1, close_of(sid, candle, late.get(i, 0))))
    return truth, frames


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    count=st.integers(1, 20),
    two_series=st.booleans(),
    empty_store=st.booleans(),
)
def test_no_forming_candle_ever_overtakes_a_close_of_its_series(
    data: st.DataObject, count: int, two_series: bool, empty_store: bool
) -> None:
    """For random frame sequences — forming updates at any time, closes lost, repeated or
    late, exchange holes, reconnects, a REST that answers late or fails for a while, commits
    that take a while, an empty store's initial backfill — what the core hands to the hub
    for a series (published closed candles, base and derived, and forming candles, in
    order) never has a forming candle of bar t before a closed candle below t that is
    published later. (Unless REST failed so long that held candles went over a hole: the
    hole's candles then come later, as a backfill.)"""
    series = [BTC, ETH] if two_series else [BTC]
    truths: dict[SeriesId, dict[int, Candle]] = {}
    frames: list[tuple[int, str]] = []
    for sid in series:
        truths[sid], sent = data.draw(streams(sid, count))
        frames += sent
    frames.sort(key=lambda f: f[0])
    reconnects = data.draw(st.sets(st.integers(0, len(frames)), max_size=2))
    answer_at = data.draw(st.sets(st.integers(0, len(frames)), max_size=len(frames) + 1))
    down_from = data.draw(st.integers(0, len(frames)))
    down = range(down_from, down_from + data.draw(st.integers(0, 12)))
    commit_steps = data.draw(st.integers(1, 4))  # how many frames a commit takes
    throttle_ms = data.draw(st.sampled_from(["0", "250"]))
    core = make_core(
        series,
        head=None if empty_store else T0 - 60,
        policy=IngestPolicy(hold_max_s=5.0),
        market_forming_min_interval_ms=throttle_ms,
        binance_ws_flush_s=data.draw(st.sampled_from(["0", "0.3"])),  # group commit, or not
        initial_backfill_candles="3" if empty_store else "0",
    )
    driver = Driver(core, truths, rest_lag_ms=data.draw(st.sampled_from([0, 5_000])))
    generation = 1
    in_flight: tuple[int, list[BatchItem]] | None = None
    for step, (_, raw) in enumerate(frames):
        driver.now += 0.1
        generation += step in reconnects
        driver.send(raw, generation)
        if step in answer_at:
            driver.rest_up = step not in down
            driver.answer()
        if in_flight is not None and step >= in_flight[0]:
            driver.finish(in_flight[1])
            in_flight = None
        if in_flight is None and (items := driver.take()) is not None:
            in_flight = (step + commit_steps, list(items))
    if in_flight is not None:
        driver.finish(in_flight[1])
    # the streams move on to the minute after the data: every minute of it is late now
    end = T0 + 60 * count
    last_ms = end * 1000 + LATE_S * 1000 + driver.rest_lag_ms
    driver.rest_up = True
    for sid in series:
        driver.send(kline(sid, bar(end), closed=False, event_time_ms=last_ms), generation)
    driver.answer()
    driver.settle()

    for sid in series:
        committed = set(driver.times(sid))
        if empty_store:  # the history starts where the initial backfill reached
            first = min(committed, default=end)
            assert committed == {t for t in truths[sid] if t >= first}
        else:
            assert committed == set(truths[sid])
    if driver.forced == 0:
        for sid in series:
            assert driver.times(sid) == sorted(driver.times(sid))
        assert overtaken(driver.sent) == []
    assert core.queued == 0 and not core.gate.owes(BTC)


def test_overtaken_finds_a_close_sent_after_a_newer_forming_candle() -> None:
    """The checker itself: per series, by bar time."""
    sent = [
        Sent("a", "forming", 120),
        Sent("b", "closed", 60),
        Sent("a", "closed", 120),
        Sent("a", "closed", 60),
    ]
    assert overtaken(sent) == [(sent[0], sent[3])]


@pytest.mark.parametrize("flush_s", ["0", "0.5"])
def test_a_steady_stream_publishes_each_close_before_the_next_bars_forming(flush_s: str) -> None:
    """Live, one series, closes in time: every close goes out at once, and the next bar's
    forming updates follow it — no update is lost to the gate."""
    truth = truth_of(6)
    driver = Driver(make_core(binance_ws_flush_s=flush_s), {BTC: truth})
    for candle in truth.values():
        for into_ms in (10_000, 40_000):
            driver.send(forming_of(BTC, candle, into_ms))
            driver.commit_due()
        driver.send(close_of(BTC, candle))
        driver.commit_due()
    expected = []
    for t in truth:
        expected += [("forming", t), ("forming", t), ("closed", t)]
    assert kinds(driver) == expected
