"""IngestCore (pure): every rule of the ingest loop, driven synchronously — no trio, no
sockets. A small Driver (tests/ingest/driver.py) plays the shell: it feeds raw Binance
frames, answers the REST fills the core asks for from a "truth" of minutes, and commits what
the core queues. The ordering rules (forming after closes, flushes) are in test_ordering.py."""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.ingest.driver import (
    BTC,
    ETH,
    LATE_S,
    T0,
    Driver,
    bar,
    close_of,
    forming_of,
    kline,
    make_core,
    overtaken,
    truth_of,
)
from tradecanvas.ingest.outcomes import FrameOutcome
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.tracker import FillRequest
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.wire.binance import KlineEvent, decode_frame
from tradecanvas.wire.json import dumps
from tradecanvas.wire.kline_csv import read_kline_csv

# --- the core is pure ------------------------------------------------------------------


def test_the_core_imports_neither_trio_nor_a_socket_or_http_library() -> None:
    code = (
        "import sys, tradecanvas.ingest.core;"
        " assert not {'trio', 'trio_websocket', 'httpx'} & set(sys.modules), sorted(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_one_market_and_1m_series_only() -> None:
    with pytest.raises(ValueError, match="one market"):
        make_core([BTC, SeriesId.parse("binance:spot:BTC/USDT:1m")])
    with pytest.raises(ValueError, match="only 1m"):
        make_core([SeriesId.parse("binance:futures:BTC/USDT:5m")])


# --- frames ----------------------------------------------------------------------------


def test_real_captured_frames_give_forming_updates_and_closed_candles(data_dir: Path) -> None:
    path = data_dir / "ws" / "futures_um" / "kline_1m_frames_2021-07-22T22-25Z.jsonl"
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    events = [e for e in map(decode_frame, lines) if isinstance(e, KlineEvent)]
    series = [
        SeriesId.parse(f"binance:futures:{s}/USDT:1m") for s in ("CTK", "SUSHI", "AKRO", "KEEP")
    ]
    driver = Driver(make_core(series, head=None), {})
    for line in lines:
        driver.send(line)
        driver.commit_due()  # the committer task, idle between frames
    driver.commit()
    assert driver.malformed == [] and overtaken(driver.sent) == []
    for sid in series:
        mine = [e for e in events if e.symbol == sid.rest_symbol]
        assert driver.candles(sid) == [e.candle for e in mine if e.closed]
        # every field exactly as sent (no throttle here); only an update that came while
        # a close before it waited for its commit was superseded by a newer one
        sent = [e.candle for e in mine if not e.closed]
        forming = [c for s, c in driver.forming if s == str(sid)]
        assert is_subsequence(forming, sent) and len(forming) >= len(sent) - 4
        five = str(sid.with_timeframe(Timeframe.parse("5m")))
        assert len([s for s, _ in driver.forming if s == five]) == len(forming)


def is_subsequence(part: Sequence[Candle], whole: Sequence[Candle]) -> bool:
    rest = iter(whole)
    return all(any(c == w for w in rest) for c in part)


def test_malformed_frames_are_reported_once_per_kind_and_change_nothing() -> None:
    good = bar(T0)
    doc = orjson.loads(close_of(BTC, good))
    doc["data"]["k"]["h"] = "0.5"  # high below low
    bad_values = dumps(doc)
    driver = Driver(make_core(), {BTC: {}})
    frames = [
        "this is not json",
        "[1, 2, 3]",
        '{"stream":"btcusdt@kline_1m","data":{"e":"kline","E":1}}',
        bad_values,
        '{"no":"event type"}',
        "not json either",
        kline(ETH, good, closed=True, event_time_ms=(T0 + 60) * 1000),  # not ingested here
    ]
    firsts = []
    for raw in frames:
        outcome = driver.send(raw)
        assert outcome.malformed is not None and not outcome.wake_committer
        firsts.append(outcome.malformed.first)
    assert driver.malformed == [
        "not_json",
        "not_object",
        "bad_kline",
        "bad_kline_values",
        "no_event_type",
        "not_json",
        "unknown_stream",
    ]
    assert firsts == [True, True, True, True, True, False, True]
    # acks and other events are not malformed, and change nothing either
    for raw in ('{"result":null,"id":1}', '{"e":"aggTrade","E":1}', '{"e":"serverShutdown"}'):
        assert driver.send(raw) == FrameOutcome()
    assert driver.core.queued == 0 and driver.fills == []
    # a candle the store refused counts under its own kind
    assert driver.core.malformed("bad_candle", "x").first
    assert not driver.core.malformed("bad_candle", "y").first


def test_forming_updates_are_throttled_and_never_for_a_closed_bar() -> None:
    core = make_core(market_forming_min_interval_ms="250")
    driver = Driver(core, {BTC: {}})
    a, b, c = bar(T0, 100), bar(T0, 101), bar(T0, 102)
    driver.send(forming_of(BTC, a, 1_000))
    driver.now = 0.1
    driver.send(forming_of(BTC, b, 2_000))  # inside the interval: kept pending
    assert [f for s, f in driver.forming if s == str(BTC)] == [a]
    assert core.next_forming_due() == 0.25
    driver.now = 0.2
    driver.send(forming_of(BTC, c, 3_000))  # replaces the pending one
    assert core.due_forming(0.24) == []
    assert core.due_forming(0.25) == [(BTC, c)]
    # a pending update of a bar whose close arrives is dropped
    driver.now = 0.3
    driver.send(forming_of(BTC, b, 4_000))
    driver.send(close_of(BTC, a))
    assert core.next_forming_due() is None
    # and a forming frame of a bar already closed is not passed on
    driver.now = 10.0
    assert driver.send(forming_of(BTC, a, 59_000)).forming == ()


def test_forming_derived_candles_count_every_closed_minute_of_their_bucket(
    data_dir: Path,
) -> None:
    """A 5m forming bar counts every closed minute of its bucket: its volume never goes
    down within a bucket, and its last update is Binance's closed 5m bar. (While a close
    waits for its commit the next forming update is held: test_ordering.py.)"""
    folder = data_dir / "klines_1m_5m" / "futures_um"
    one = read_kline_csv(folder / "BTCUSDT-1m-2025-07-06_2025-07-12.csv")[:10]
    five = read_kline_csv(folder / "BTCUSDT-5m-2025-07-06_2025-07-12.csv")[:2]
    driver = Driver(make_core(head=one[0].candle_time - 60), {BTC: {}})
    five_id = "binance:futures:BTC/USDT:5m"
    for minute in one:
        for raw in (forming_of(BTC, minute, 1_000), forming_of(BTC, minute, 59_000)):
            driver.send(raw)
            driver.commit_due()
        driver.send(close_of(BTC, minute))
        driver.commit_due()
    assert driver.times() == [m.candle_time for m in one]
    volumes = [c.volume for s, c in driver.forming if s == five_id]
    assert len(volumes) == 20
    for bucket in (volumes[:10], volumes[10:]):
        assert bucket == sorted(bucket)
    # the last forming update of each bucket is Binance's closed 5m bar
    last = [c for s, c in driver.forming if s == five_id][9::10]
    assert all(a.same_values(b) for a, b in zip(last, five, strict=True))


# --- holes and REST fills --------------------------------------------------------------


def test_a_new_connection_backfills_from_the_head_to_its_first_frame() -> None:
    truth = truth_of(30)
    driver = Driver(make_core(), {BTC: truth})
    rows = list(truth.values())
    for candle in rows[:10]:
        driver.send(close_of(BTC, candle), generation=1)
    # the connection drops; minutes 10..19 are never sent; a new one starts at 20
    for candle in rows[20:]:
        driver.send(close_of(BTC, candle), generation=2)
    # up to the held close of minute 20: REST returning it proves what it lacks below
    assert driver.fills == [FillRequest(T0 + 600, T0 + 1260, "reconnect")]
    driver.answer()
    driver.commit()
    assert driver.candles() == rows
    assert driver.rest_released == 10 and driver.repaired == 0


def test_repeated_closes_are_dropped() -> None:
    truth = truth_of(60)
    driver = Driver(make_core(), {BTC: truth})
    repeats = 0
    for i, candle in enumerate(truth.values()):
        driver.send(forming_of(BTC, candle))
        driver.send(close_of(BTC, candle))
        if i % 3 == 2:  # a renewal overlap or a duplicated frame
            assert not driver.send(close_of(BTC, candle, late_ms=200)).wake_committer
            repeats += 1
    driver.settle()
    assert repeats == 20 and driver.candles() == list(truth.values())
    assert driver.fills == []
    # a different value for a released minute is a revision: passed on for the pipeline
    revised = attrs.evolve(bar(T0 + 60), close=Decimal("99"))
    assert driver.send(close_of(BTC, revised, late_ms=9_000_000)).wake_committer


def test_a_late_close_is_fetched_by_exchange_time_of_any_stream_never_the_wall_clock() -> None:
    btc, eth = truth_of(3), truth_of(3)
    driver = Driver(make_core([BTC, ETH]), {BTC: btc, ETH: eth})
    bar0 = btc[T0]
    driver.send(forming_of(BTC, bar0, 15_000))
    driver.now = 1e9  # any amount of wall-clock time changes nothing
    driver.send(forming_of(ETH, eth[T0], 20_000))
    driver.send(close_of(ETH, eth[T0]))  # ETH's close comes, BTC's does not
    assert driver.fills == []
    # ETH's frames move the connection's exchange clock: BTC's close is late at T0+70 s
    deadline_ms = (T0 + 60 + LATE_S) * 1000
    driver.send(kline(ETH, eth[T0 + 60], closed=False, event_time_ms=deadline_ms - 1))
    assert driver.fills == []
    outcome = driver.send(kline(ETH, eth[T0 + 60], closed=False, event_time_ms=deadline_ms))
    assert outcome.wake_fills
    assert driver.fills == [FillRequest(T0, T0 + 60, "late_close")]
    driver.answer()
    driver.commit()
    assert driver.candles(BTC) == [bar0]
    assert driver.rest_released == 1 and driver.repaired == 1


def test_omitted_closes_are_all_repaired() -> None:
    truth = truth_of(100)
    driver = Driver(make_core(), {BTC: truth})
    for i, candle in enumerate(truth.values()):
        driver.send(forming_of(BTC, candle))
        if i % 7 != 3:
            driver.send(close_of(BTC, candle))
        driver.answer()
    driver.send(forming_of(BTC, bar(T0 + 6000), LATE_S * 1000))  # the last one is late too
    driver.settle()
    assert driver.candles() == list(truth.values())
    assert driver.repaired == 14 and driver.absent == 0


def test_an_exchange_hole_is_committed_around_once_rest_confirms_it() -> None:
    truth = truth_of(20, missing=range(5, 8))
    driver = Driver(make_core(), {BTC: truth})
    for candle in truth.values():
        driver.send(close_of(BTC, candle))
    # minute 8 is held until REST answered for 5..7 (asked up to minute 8: REST returning
    # it proves 5..7 absent); by the time minute 8 closes, minute 7's close is late too
    assert driver.fills[0] == FillRequest(T0 + 300, T0 + 540, "late_close")
    assert driver.times() == [] and driver.core.held_count() >= 1
    driver.answer()
    driver.commit()
    assert driver.candles() == list(truth.values())
    assert driver.absent == 3 and driver.core.trackers[BTC].unresolved == ()


def test_a_minute_a_lagging_rest_lacked_is_stored_once_rechecked() -> None:
    """REST 90 s behind the exchange (late_close is 10 s): a lost close's minute is
    called absent on exchange time alone and the candles above it go on; asked for once
    more REST_LAG_MAX_MS after its end, it is stored (below the head: a backfill)."""
    truth = truth_of(8)
    driver = Driver(make_core(), {BTC: truth}, rest_lag_ms=90_000)
    for i, candle in enumerate(truth.values()):
        if i != 2:  # minute 2's close is lost
            driver.send(close_of(BTC, candle))
        driver.answer()
        driver.commit()
    assert driver.absent == 1 and driver.absent_runs() == [(T0 + 120, T0 + 180)]
    rechecks = [f for f in driver.fills if f.reason == "recheck"]
    assert rechecks == [FillRequest(T0 + 120, T0 + 180, "recheck")]
    assert sorted(driver.times()) == sorted(truth)
    assert driver.times().index(T0 + 120) > driver.times().index(T0 + 180)


def test_a_restart_rechecks_a_minute_the_last_run_called_absent() -> None:
    """The last run stopped between calling minute 2 absent (REST lagging) and its
    recheck: the stored minutes around it, loaded at start-up, bring the recheck back."""
    truth = truth_of(8)
    core = make_core(head=None)
    stored = [c for t, c in truth.items() if t < T0 + 240 and t != T0 + 120]
    core.load_series(BTC, head=T0 + 180, first=T0, unresolved=(), recent=stored)
    driver = Driver(core, {BTC: truth}, rest_lag_ms=90_000)
    for candle in list(truth.values())[4:]:
        driver.send(close_of(BTC, candle))
        driver.answer()
        driver.commit()
    assert FillRequest(T0 + 120, T0 + 180, "recheck") in driver.fills
    assert sorted(driver.times()) == [T0 + 120, *(t for t in truth if t >= T0 + 240)]


def test_an_empty_store_fetches_the_initial_history_first() -> None:
    truth = truth_of(10)
    driver = Driver(make_core(head=None, initial_backfill_candles="5"), {BTC: truth})
    rows = list(truth.values())
    driver.send(forming_of(BTC, rows[5]))
    assert driver.fills == [FillRequest(T0, T0 + 300, "initial")]
    driver.send(close_of(BTC, rows[5]))
    assert driver.core.queued == 0  # held until the history is in
    driver.answer()
    driver.commit()
    assert driver.candles() == rows[:6] and driver.rest_released == 5


def test_no_fill_starts_while_the_commit_backlog_is_full() -> None:
    """Closed candles waiting for a commit plus the minutes of the fills in flight are
    bounded by backlog_max: fills wait, and a commit that makes room wakes them."""
    truth = {sid: truth_of(12) for sid in (BTC, ETH)}
    core = make_core([BTC, ETH], policy=IngestPolicy(backlog_max=5), binance_ws_batch_max="3")
    driver = Driver(core, truth)
    for t in range(T0, T0 + 180, 60):
        for sid in (BTC, ETH):
            driver.send(close_of(sid, truth[sid][t]), generation=1)
    assert core.queued == 6 and core.backlogged()
    # both reconnect with seven minutes to fetch: neither may start
    for sid in (BTC, ETH):
        driver.send(close_of(sid, truth[sid][T0 + 600]), generation=2)
    assert driver.fills == [] and core.next_fills(driver.now).wake_at == math.inf
    batch = core.take_batch()
    assert batch is not None and batch.wake_fills  # a commit made room: look again
    driver.committed.extend(batch.items)
    driver.plan()
    # 3 queued + the 8 minutes of BTC's fill in flight (up to its held close): ETH's waits
    assert driver.fills == [FillRequest(T0 + 180, T0 + 660, "reconnect")]
    assert core.backlogged()
    driver.answer()  # BTC's 7 minutes and its held close are queued: still full
    driver.plan()
    assert driver.pending == []
    driver.commit()
    driver.plan()
    assert [sid for sid, _ in driver.pending] == [ETH]
    driver.answer()
    driver.commit()
    for sid in (BTC, ETH):
        assert driver.candles(sid) == list(truth[sid].values())[:11]


def test_held_candles_go_over_the_hole_when_rest_keeps_failing_and_the_hole_is_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Nothing received is lost: with REST failing, the candles held above a hole are
    queued after hold_max_s with the hole recorded (on the first candle above it); a later
    retry brings the missing minute and the last candle it brings forgets the record."""
    # the backoff's longest pause every time (no jitter): the same fills every run
    monkeypatch.setattr("tradecanvas.upstream.backoff.random.uniform", lambda lo, hi: hi)
    policy = IngestPolicy(hold_max_s=120.0)
    truth = truth_of(6)
    rows = list(truth.values())
    driver = Driver(make_core(policy=policy), {BTC: truth}, rest_up=False)
    driver.send(close_of(BTC, rows[0]))
    driver.send(close_of(BTC, rows[3]))  # minutes 1 and 2 are missing
    driver.answer()  # fails
    driver.now = 119.9
    driver.plan()
    driver.answer()  # fails again
    plan = driver.core.next_fills(driver.now)
    assert plan.start == () and plan.forced == ()
    assert plan.wake_at <= 120.0  # a retry, or when the held candle goes
    assert driver.forced == 0
    driver.now = 120.0
    driver.plan()
    assert driver.forced == 1
    driver.send(close_of(BTC, rows[4]))
    driver.commit()
    hole = ((T0 + 60, T0 + 180),)
    assert driver.times() == [T0, T0 + 180, T0 + 240]
    assert [i.holes for i in driver.committed] == [(), hole, hole]
    # REST is back: the retry fills the hole below the head
    driver.rest_up = True
    driver.committed.clear()
    driver.settle()
    assert driver.candles() == rows[1:3]
    assert [i.released.reason for i in driver.committed if i.released] == ["retry", "retry"]
    assert [i.holes for i in driver.committed] == [hole, ()]
    assert driver.core.trackers[BTC].unresolved == () and driver.absent == 0


def test_a_retry_that_finds_a_hole_absent_drops_it_from_the_records_queued_before() -> None:
    """Settled holes are not stored again by a live candle queued before the retry (a
    restart would retry them and count their minutes twice)."""
    hole = (T0, T0 + 180)
    truth = truth_of(10, missing=range(3))
    core = make_core(head=T0 + 300, unresolved=(hole,))
    driver = Driver(core, {BTC: truth})
    driver.send(close_of(BTC, truth[T0 + 360], late_ms=100))  # queued with the hole record
    assert driver.fills == [FillRequest(*hole, "retry")]
    driver.answer()  # REST has none of the three minutes
    assert driver.absent == 3 and core.trackers[BTC].unresolved == ()
    assert driver.saved_holes == {}  # the queued candle carries the (now empty) record
    driver.commit()
    # the candle, then the absent run (a gap), both with the empty record
    assert [i.holes for i in driver.committed] == [(), ()]
    assert driver.times() == [T0 + 360] and driver.absent_runs() == [hole]


def test_a_retry_that_finds_its_hole_absent_commits_the_gap_with_the_holes_record() -> None:
    """With nothing else queued, the absent run is committed on its own (a gap event), and
    carries the series' holes record into the store in the same transaction."""
    hole = (T0, T0 + 180)
    core = make_core(head=T0 + 300, unresolved=(hole,))
    driver = Driver(core, {BTC: truth_of(10, missing=range(3))})
    driver.send(forming_of(BTC, bar(T0 + 360), LATE_S * 1000 + 1))
    driver.answer()
    assert driver.absent == 3 and driver.saved_holes == {}
    assert core.holes_to_save(BTC) is None  # the queued run carries the record
    driver.commit()
    assert [(i.absent, i.holes) for i in driver.committed] == [(hole, ())]
    assert core.holes_to_save(BTC) == ()


def test_a_failed_fill_is_asked_again_after_a_backoff() -> None:
    policy = IngestPolicy(fill_retry_base_s=0.0, fill_retry_cap_s=0.0)
    truth = truth_of(3)
    driver = Driver(make_core(policy=policy), {BTC: truth}, rest_up=False)
    driver.send(close_of(BTC, truth[T0 + 120]))
    driver.answer()
    plan = driver.core.next_fills(0.0)
    assert plan.start == () and plan.wake_at == 0.1  # FILL_RETRY_MIN_S
    # the first frame of a connection: the range is asked for as a reconnect's, up to the
    # held close
    assert driver.core.next_fills(0.1).start == ((BTC, FillRequest(T0, T0 + 180, "reconnect")),)


def test_shutdown_queues_held_candles_over_their_hole() -> None:
    truth = truth_of(4)
    rows = list(truth.values())
    driver = Driver(make_core(), {BTC: truth})
    driver.send(close_of(BTC, rows[0]))
    driver.send(close_of(BTC, rows[3]))
    assert driver.core.held_count() == 1
    driver.core.release_all_held(driver.now)
    assert driver.core.queued == 2 and driver.core.held_count() == 0
    driver.core.release_all_held(driver.now)
    assert driver.core.queued == 2
    driver.commit()
    assert driver.times() == [T0, T0 + 180]
    assert driver.committed[-1].holes == ((T0 + 60, T0 + 180),)
    assert driver.core.holes_to_save(BTC) == ((T0 + 60, T0 + 180),)


# --- the whole: any frame sequence -------------------------------------------------------


@st.composite
def arrivals(
    draw: st.DrawFn, sid: SeriesId, count: int
) -> tuple[dict[int, Candle], list[tuple[int, str]]]:
    """A truth of ``count`` minutes (some missing at the exchange) and the frames Binance
    sends for it, each with the exchange time it was sent at: forming updates, closes
    (some never sent, some repeated, some late)."""
    indices = st.sets(st.integers(0, count - 1), max_size=count)
    missing = draw(indices)
    lost = draw(indices)
    repeated = draw(indices)
    late = draw(st.dictionaries(st.integers(0, count - 1), st.integers(1, 150_000), max_size=5))
    truth = truth_of(count, missing)
    frames: list[tuple[int, str]] = []
    for i, (t, candle) in enumerate(truth.items()):
        if draw(st.booleans()):
            frames.append((t * 1000 + 30_000, forming_of(sid, candle)))
        if i in lost:
            continue
        sent_ms = (t + 60) * 1000 + late.get(i, 0)
        frames.append((sent_ms, close_of(sid, candle, late.get(i, 0))))
        if i in repeated:
            frames.append((sent_ms + 1, close_of(sid, candle, late.get(i, 0))))
    return truth, frames


@settings(max_examples=150, deadline=None)
@given(data=st.data(), count=st.integers(1, 25), two_series=st.booleans())
def test_any_frame_sequence_commits_every_existing_minute_once_in_order(
    data: st.DataObject, count: int, two_series: bool
) -> None:
    """Duplicates, out-of-order frames, closes never sent, late closes, new connections,
    a REST that lags and fails for a while, with exchange holes: every closed minute that
    exists is committed exactly once — in time order unless REST failed for longer than
    hold_max_s — and the minutes reported absent are exactly the missing ones."""
    series = [BTC, ETH] if two_series else [BTC]
    truths: dict[SeriesId, dict[int, Candle]] = {}
    frames: list[tuple[int, str]] = []
    for sid in series:
        truths[sid], sent = data.draw(arrivals(sid, count))
        frames += sent
    frames.sort(key=lambda f: f[0])
    # out of order: neighbours swapped
    for i in data.draw(st.lists(st.integers(0, max(len(frames) - 2, 0)), max_size=8)):
        if i + 1 < len(frames):
            frames[i], frames[i + 1] = frames[i + 1], frames[i]
    reconnects = data.draw(st.sets(st.integers(0, len(frames)), max_size=3))
    # REST answers at some steps only (fills stay in flight meanwhile), and is down for a
    # stretch of steps (one a second: longer than hold_max_s, held candles go over holes)
    answer_at = data.draw(st.sets(st.integers(0, len(frames)), max_size=len(frames) + 1))
    down_from = data.draw(st.integers(0, len(frames)))
    down = range(down_from, down_from + data.draw(st.integers(0, 12)))
    late_s = data.draw(st.sampled_from([LATE_S, 90]))  # 90: a close REST asks for as a hole
    policy = IngestPolicy(hold_max_s=5.0)
    core = make_core(
        series, policy=policy, late_close_s=str(late_s), market_forming_min_interval_ms="250"
    )
    driver = Driver(core, truths, rest_lag_ms=data.draw(st.sampled_from([0, 5_000])))
    generation = 1
    for step, (_, raw) in enumerate(frames):
        driver.now += 1.0
        generation += step in reconnects
        driver.send(raw, generation)
        if step in answer_at:
            driver.rest_up = step not in down
            driver.answer()
        if step % 3 == 0:
            driver.commit()
    # the stream moves on to the minute after the data: every minute of it is late now
    end = T0 + 60 * count
    last_ms = end * 1000 + late_s * 1000 + driver.rest_lag_ms
    driver.rest_up = True
    driver.send(kline(series[0], bar(end), closed=False, event_time_ms=last_ms), generation)
    driver.answer()
    driver.settle()

    # missing at the exchange: the minutes without data that exchange time made late
    late_upto = (driver.exchange_ms - late_s * 1000) // 60_000 * 60
    missing = [t for t in range(T0, late_upto, 60) for truth in truths.values() if t not in truth]
    assert driver.absent == len(missing)
    for sid in series:
        committed = driver.candles(sid)
        assert sorted(committed, key=lambda c: c.candle_time) == list(truths[sid].values())
        assert len({c.candle_time for c in committed}) == len(committed)
        if driver.forced == 0:
            assert committed == list(truths[sid].values())
        assert core.trackers[sid].unresolved == ()
    assert core.held_count() == 0 and core.queued == 0


@settings(max_examples=100, deadline=None)
@given(
    closes=st.lists(st.tuples(st.integers(0, 15), st.booleans()), max_size=40),
    holes=st.sets(st.integers(0, 15)),
)
def test_a_minute_is_released_again_only_with_other_values(
    closes: list[tuple[int, bool]], holes: set[int]
) -> None:
    """Closes in any order, some repeated, some with other values (REST answering at
    once): below the head only a revision is released — the candle just received, with
    values other than the last released for its minute — and in the end every minute
    that exists has been released."""
    truth = truth_of(16, holes)
    driver = Driver(make_core(), {BTC: truth})
    last: dict[int, Candle] = {}

    def check(done: int, head: int, sent: Candle | None) -> None:
        for item in driver.committed[done:]:
            released = item.candle
            if released is None:
                continue  # an absent run
            if released.candle_time <= head:
                assert released == sent
            previous = last.get(released.candle_time)
            assert previous is None or not previous.same_values(released)
            last[released.candle_time] = released

    for minute, revised in closes:
        t = T0 + 60 * minute
        if t not in truth:
            continue
        candle = attrs.evolve(truth[t], close=truth[t].high) if revised else truth[t]
        head = driver.core.trackers[BTC].head
        assert head is not None
        done = len(driver.committed)
        driver.send(close_of(BTC, candle))
        driver.answer()
        driver.commit()
        check(done, head, candle)
    head, done = driver.core.trackers[BTC].head, len(driver.committed)
    assert head is not None
    driver.send(forming_of(BTC, bar(T0 + 960), LATE_S * 1000))
    driver.settle()
    check(done, head, None)
    assert sorted(last) == sorted(truth)
