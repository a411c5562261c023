"""Forming derived bars and where the store's history starts (pure, with the Driver of
tests/ingest/driver.py): a bucket begun before the series' first stored minute gets no
forming bar — Binance's bar holds minutes the store never had, and the commit path leaves
such a bucket out too (``BatchCommit._bar``) — while every bucket inside the history, one
whose first minutes are absent at the exchange included, keeps its forming bars."""

from __future__ import annotations

import pytest

from tests.ingest.driver import BTC, T0, Driver, bar, close_of, forming_of, make_core, truth_of
from tradecanvas.ingest.batcher import MinuteCache
from tradecanvas.ingest.tracker import FillRequest
from tradecanvas.model import Candle, Timeframe
from tradecanvas.pipeline.derive import aggregate

DAY = 86_400
MONDAY = T0 + DAY  # 2025-07-07 00:00 UTC, a 1w bucket's open (T0 is a Sunday)
WEDNESDAY_1430 = MONDAY + 2 * DAY + 14 * 3600 + 1800
DERIVED = "5m,1d,1w"


def forming_series(driver: Driver) -> set[str]:
    """The timeframes (as in series ids) forming updates were sent for."""
    return {series_id.rsplit(":", 1)[1] for series_id, _ in driver.forming}


def last_forming(driver: Driver, timeframe: str) -> Candle:
    series_id = str(BTC.with_timeframe(Timeframe.parse(timeframe)))
    return [c for s, c in driver.forming if s == series_id][-1]


def test_an_initial_backfill_from_mid_week_sends_no_forming_bar_of_the_day_or_week() -> None:
    """The review's case: an empty store backfills 30 minutes before the first live one,
    Wednesday 14:30, so its history starts at 14:00; Binance's day and week bars hold minutes
    from before that. The 1m and 5m forming bars go out (their buckets are whole); the
    1d and 1w ones, built from 14:00 on, would be wrong (before the fix they were sent)."""
    live = WEDNESDAY_1430
    truth = truth_of(40, start=live - 1800)
    core = make_core(head=None, derived_timeframes=DERIVED, initial_backfill_candles="30")
    driver = Driver(core, {BTC: truth})
    driver.send(forming_of(BTC, truth[live]))
    assert driver.fills == [FillRequest(live - 1800, live, "initial")]
    driver.answer()
    driver.commit()
    assert core.minutes.history_start(BTC) == live - 1800
    for t in range(live, live + 600, 60):  # ten more minutes, one 5m bucket ending
        driver.send(forming_of(BTC, truth[t], 50_000))
        driver.send(close_of(BTC, truth[t]))
        driver.commit()
    assert forming_series(driver) == {"1m", "5m"}
    fives = [c.candle_time for s, c in driver.forming if s.endswith(":5m")]
    assert fives[0] == live and fives[-1] == live + 300


def test_an_initial_backfill_from_before_the_buckets_sends_every_forming_bar() -> None:
    """History from Sunday 23:40 (30 minutes before Monday 00:10): the 5m, 1d and 1w buckets
    of Monday 00:10 begin inside it, so each forming bar goes out and holds every minute
    of its bucket."""
    live = MONDAY + 600
    truth = truth_of(40, start=live - 1800)
    core = make_core(head=None, derived_timeframes=DERIVED, initial_backfill_candles="30")
    driver = Driver(core, {BTC: truth})
    driver.send(forming_of(BTC, truth[live]))
    driver.answer()
    driver.commit()
    assert forming_series(driver) == {"1m", "5m", "1d", "1w"}
    whole = aggregate(MONDAY, [truth[t] for t in range(MONDAY, live + 60, 60)])
    assert last_forming(driver, "1w") == whole
    assert last_forming(driver, "1d") == whole
    assert last_forming(driver, "5m") == aggregate(live, [truth[live]])


@pytest.mark.parametrize(
    ("first", "sent"),
    [
        (WEDNESDAY_1430 - 1800, {"1m", "5m"}),  # the history starts this afternoon
        (MONDAY + DAY + 12 * 3600, {"1m", "5m", "1d"}),  # Tuesday noon: inside the week
        (MONDAY, {"1m", "5m", "1d", "1w"}),  # the week's open: every bucket is whole
        (T0, {"1m", "5m", "1d", "1w"}),
    ],
)
def test_a_restart_takes_the_history_start_from_the_store(first: int, sent: set[str]) -> None:
    """A store that holds minutes from ``first`` up to 14:29 on Wednesday, loaded at start-up:
    the forming bar of each bucket begun before ``first`` is left out, the others go out."""
    live = WEDNESDAY_1430
    core = make_core(head=live - 60, first=first, derived_timeframes=DERIVED)
    driver = Driver(core, {BTC: {}})
    driver.send(forming_of(BTC, bar(live)))
    assert forming_series(driver) == sent


def test_a_bucket_whose_first_minutes_are_absent_at_the_exchange_keeps_its_forming_bars() -> None:
    """A real hole, not the history's start: the store holds Sunday, the exchange has no
    minute from Sunday 23:58 to Monday 00:04. Monday's 1d and 1w buckets begin inside the
    history, so their forming bars — of the minutes there, as their closed bars will be —
    go out once REST has confirmed the hole."""
    missing = range(2, 9)  # Sunday 23:58 … Monday 00:04
    truth = truth_of(12, missing=missing, start=MONDAY - 240)
    core = make_core(head=MONDAY - 180, first=T0, derived_timeframes=DERIVED)
    driver = Driver(core, {BTC: truth})
    live = MONDAY + 300
    driver.send(forming_of(BTC, truth[live]))
    driver.answer()
    driver.commit()
    assert driver.absent_runs() == [(MONDAY - 120, MONDAY + 300)]
    assert forming_series(driver) == {"1m", "5m", "1d", "1w"}
    alone = aggregate(MONDAY, [truth[live]])
    assert last_forming(driver, "1w") == alone and last_forming(driver, "1d") == alone


def test_the_minute_cache_knows_where_the_history_starts() -> None:
    cache = MinuteCache(3600)
    assert cache.history_start(BTC) is None
    cache.add(BTC, [bar(T0 + 600), bar(T0 + 660)])
    assert cache.history_start(BTC) == T0 + 600  # an empty store: its first minute added
    cache.add(BTC, [bar(T0 + 720)])
    cache.add(BTC, [bar(T0 + 300)])  # history fetched below it
    assert cache.history_start(BTC) == T0 + 300
    cache.add(BTC, [bar(T0 + 3600 * 5)])  # the old minutes are trimmed; the start stays
    assert cache.bucket(BTC, Timeframe.parse("1h"), T0 + 600)[0] == []
    assert cache.history_start(BTC) == T0 + 300
    cache.start_history(BTC, T0 - 60)  # the store's, at start-up
    assert cache.history_start(BTC) == T0 - 60
    cache.start_history(BTC, None)
    assert cache.history_start(BTC) is None


def test_history_another_process_stored_reaches_the_forming_bars() -> None:
    """The store's history started Wednesday 14:00 when the daemon loaded it; ``backfill``
    beside it stored the week from Monday 00:00 (the event tail tells the loop, which reads
    the store again: ``ingest/history_refresh.py``). From the next forming minute the day's
    and the week's bars go out, of every minute of their buckets."""
    live = WEDNESDAY_1430
    core = make_core(head=live - 60, first=live - 1800, derived_timeframes=DERIVED)
    driver = Driver(core, {BTC: {}})
    driver.send(forming_of(BTC, bar(live)))
    assert forming_series(driver) == {"1m", "5m"}
    week = [bar(t, price=100 + (t // 60) % 7) for t in range(MONDAY, live, 60)]
    assert core.minutes.extend_history(BTC, MONDAY, week)
    assert not core.minutes.extend_history(BTC, MONDAY, week)  # nothing new the second time
    driver.send(forming_of(BTC, bar(live, price=90), 40_000))
    assert forming_series(driver) == {"1m", "5m", "1d", "1w"}
    forming = bar(live, price=90)
    assert last_forming(driver, "1w") == aggregate(MONDAY, [*week, forming])
    day = WEDNESDAY_1430 - (14 * 3600 + 1800)
    assert last_forming(driver, "1d") == aggregate(
        day, [c for c in week if c.candle_time >= day] + [forming]
    )


def test_history_stored_elsewhere_lowers_the_start_and_keeps_the_loops_own_minutes() -> None:
    """The minutes read back replace the cached ones — a revision counts — except those the
    loop added while the read ran (noting_adds): the store may have answered before the
    loop's own write of them landed."""
    cache = MinuteCache(3600)
    cache.add(BTC, [bar(T0 + 540), bar(T0 + 600)])
    with cache.noting_adds(BTC) as own:
        cache.add(BTC, [mine := bar(T0 + 600, price=3), bar(T0 + 660)])  # during the read
    assert own == {T0 + 600, T0 + 660}
    stale = bar(T0 + 600, price=1)  # read from the store before the loop's own write landed
    revised = bar(T0 + 540, price=2)  # another process's revision of a cached minute
    stored = [bar(T0 + 300), revised, stale, bar(T0 - 7200)]
    assert cache.extend_history(BTC, T0 + 300, stored, own)
    assert cache.history_start(BTC) == T0 + 300
    minutes, _ = cache.bucket(BTC, Timeframe.parse("1h"), T0 + 720)
    assert minutes == [bar(T0 + 300), revised, mine, bar(T0 + 660)]  # below the span: not cached
    assert not cache.extend_history(BTC, T0 + 900, [], own)  # the start only moves down
    assert not cache.extend_history(BTC, None, [revised])  # nothing new the second time
    assert cache.history_start(BTC) == T0 + 300


def test_a_revision_read_while_the_loops_close_waits_for_its_commit() -> None:
    """The refresh read the store while the loop's own close of 00:10 was still queued: the
    store answered another process's older 00:10 and its revision of 00:05. The revision
    counts; the stale 00:10 replaces the loop's only until that close is committed (it is
    added again then), and no forming bar goes out in between (the series owes a commit)."""
    core = make_core(head=T0 + 540, first=T0, derived_timeframes="5m,1h")
    core.minutes.add(BTC, [bar(t) for t in range(T0, T0 + 600, 60)])  # loaded at start-up
    driver = Driver(core, {BTC: {}})
    own = bar(T0 + 600, volume="5")
    driver.send(close_of(BTC, own))  # queued, not committed yet
    revised, stale = bar(T0 + 300, price=50), bar(T0 + 600, price=1)
    assert core.minutes.extend_history(BTC, T0, [revised, stale])
    driver.send(forming_of(BTC, bar(T0 + 660)))
    assert driver.forming == []  # held: the series owes the commit of 00:10
    driver.commit()  # the loop's 00:10 is in the store now, and in the cache again
    hourly = last_forming(driver, "1h")
    minutes = [revised if t == T0 + 300 else bar(t) for t in range(T0, T0 + 600, 60)]
    assert hourly == aggregate(T0, [*minutes, own, bar(T0 + 660)])
    assert hourly.low == 49 and hourly.volume == 10 + 5 + 1
