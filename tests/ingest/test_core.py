"""IngestCore (pure): every rule of the ingest loop, driven synchronously — no trio, no
sockets. A small Driver plays the shell: it feeds raw Binance frames, answers the REST fills
the core asks for from a "truth" of minutes, and commits what the core queues."""

from __future__ import annotations

import contextlib
import math
import subprocess
import sys
from collections.abc import Iterable, Sequence
from decimal import Decimal
from pathlib import Path

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tradecanvas.errors import WireError
from tradecanvas.ingest.batcher import BatchItem, Holes
from tradecanvas.ingest.core import FrameOutcome, IngestCore
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.tracker import FillRequest
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.wire.binance import KlineEvent, decode_frame, kline_frame
from tradecanvas.wire.json import dumps
from tradecanvas.wire.kline_csv import read_kline_csv

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
ETH = SeriesId.parse("binance:futures:ETH/USDT:1m")
T0 = 1_751_760_000  # 2025-07-06 00:00 UTC, a 5m (and day) boundary
LATE_S = 10


def bar(t: int, price: int = 100, volume: str = "1") -> Candle:
    """A minute whose every field survives a trip through a Binance frame unchanged."""
    p = Decimal(price)
    return Candle(
        t, p, p + 1, p - 1, p, Decimal(volume), Decimal("2"), 3, Decimal("0.5"), Decimal("1")
    )


def truth_of(count: int, missing: Iterable[int] = (), start: int = T0) -> dict[int, Candle]:
    gone = set(missing)
    return {start + 60 * i: bar(start + 60 * i, 100 + i) for i in range(count) if i not in gone}


def kline(sid: SeriesId, candle: Candle, *, closed: bool, event_time_ms: int) -> str:
    return dumps(kline_frame(sid, candle, closed=closed, event_time_ms=event_time_ms))


def close_of(sid: SeriesId, candle: Candle, late_ms: int = 0) -> str:
    """The close frame Binance sends as the minute ends (``late_ms`` after, if delayed)."""
    return kline(sid, candle, closed=True, event_time_ms=(candle.candle_time + 60) * 1000 + late_ms)


def forming_of(sid: SeriesId, candle: Candle, into_ms: int = 30_000) -> str:
    return kline(sid, candle, closed=False, event_time_ms=candle.candle_time * 1000 + into_ms)


def make_core(
    series: Sequence[SeriesId] = (BTC,),
    *,
    head: int | None = T0 - 60,
    unresolved: Holes = (),
    policy: IngestPolicy | None = None,
    **env: str,
) -> IngestCore:
    environ = {
        "TRADE_CANVAS_LATE_CLOSE_S": str(LATE_S),
        "TRADE_CANVAS_INITIAL_BACKFILL_CANDLES": "0",
        "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m",
        "TRADE_CANVAS_MARKET_FORMING_MIN_INTERVAL_MS": "0",
    }
    environ.update({f"TRADE_CANVAS_{k.upper()}": v for k, v in env.items()})
    flags = build_runtime_flags(environ).flags
    core = IngestCore(series, flags=flags, policy=policy or IngestPolicy())
    for sid in series:
        core.load_series(sid, head=head, unresolved=unresolved, recent=())
    return core


@attrs.define
class Driver:
    """The shell's part, synchronously: frames in, REST answered from ``truth``, commits.

    REST knows a minute once exchange time (the newest ``E`` sent) is ``rest_lag_ms`` past
    its end; ``rest_up`` False fails every fill.
    """

    core: IngestCore
    truth: dict[SeriesId, dict[int, Candle]]
    now: float = 0.0
    rest_lag_ms: int = 0
    rest_up: bool = True
    exchange_ms: int = 0
    pending: list[tuple[SeriesId, FillRequest]] = attrs.Factory(list)
    fills: list[FillRequest] = attrs.Factory(list)
    committed: list[BatchItem] = attrs.Factory(list)
    forming: list[tuple[str, Candle]] = attrs.Factory(list)
    malformed: list[str] = attrs.Factory(list)
    absent: int = 0
    rest_released: int = 0
    repaired: int = 0
    forced: int = 0
    saved_holes: dict[SeriesId, Holes] = attrs.Factory(dict)

    def send(self, raw: str, generation: int = 1) -> FrameOutcome:
        with contextlib.suppress(WireError):
            decoded = decode_frame(raw)
            if isinstance(decoded, KlineEvent):
                self.exchange_ms = max(self.exchange_ms, decoded.event_time_ms)
        outcome = self.core.on_frame(raw, generation=generation, received_at=self.now, now=self.now)
        if outcome.malformed is not None:
            self.malformed.append(outcome.malformed.reason)
        for sid, candle in outcome.forming:
            # never a forming update for a bar at or below the released head
            head = self.core.trackers[sid].head
            assert head is None or candle.candle_time > head
            self.forming.extend(self.core.forming_updates(sid, candle))
        for sid, candle in self.core.due_forming(self.now):
            self.forming.extend(self.core.forming_updates(sid, candle))
        self.plan()
        return outcome

    def plan(self) -> None:
        plan = self.core.next_fills(self.now)
        self.pending.extend(plan.start)
        self.fills.extend(request for _, request in plan.start)
        self.forced += len(plan.forced)

    def answer(self) -> None:
        """REST answers every fill in flight (and those they lead to)."""
        while self.pending:
            sid, request = self.pending.pop(0)
            if not self.rest_up:
                self.core.on_fill_failed(sid, request, self.now)
                continue
            known = [
                c
                for t, c in self.truth[sid].items()
                if request.start <= t < request.end
                and (t + 60) * 1000 + self.rest_lag_ms <= self.exchange_ms
            ]
            outcome = self.core.on_fill_result(sid, request, known, self.now)
            self.absent += outcome.absent
            self.rest_released += outcome.rest_released
            self.repaired += outcome.repaired
            if outcome.save_holes is not None:
                self.saved_holes[sid] = outcome.save_holes
            self.plan()

    def commit(self) -> None:
        while (batch := self.core.take_batch()) is not None:
            self.committed.extend(batch.items)
            self.core.on_committed(batch.items)

    def settle(self) -> None:
        """Time passes (REST retries are due), REST answers, everything is committed."""
        for _ in range(50):
            self.now += 100.0
            self.plan()
            if not self.pending:
                break
            self.answer()
        self.commit()

    def times(self, sid: SeriesId = BTC) -> list[int]:
        return [i.released.candle.candle_time for i in self.committed if i.series == sid]

    def candles(self, sid: SeriesId = BTC) -> list[Candle]:
        return [i.released.candle for i in self.committed if i.series == sid]


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
    assert driver.malformed == []
    for sid in series:
        mine = [e for e in events if e.symbol == sid.rest_symbol]
        # every field exactly as sent, every forming update (no throttle here)
        assert driver.candles(sid) == [] and driver.core.queued > 0
        forming = [c for s, c in driver.forming if s == str(sid)]
        assert forming == [e.kline.to_candle() for e in mine if not e.kline.closed]
        five = str(sid.with_timeframe(Timeframe.parse("5m")))
        assert len([s for s, _ in driver.forming if s == five]) == len(forming)
    driver.commit()
    for sid in series:
        mine = [e for e in events if e.symbol == sid.rest_symbol]
        assert driver.candles(sid) == [e.kline.to_candle() for e in mine if e.kline.closed]


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


def test_forming_derived_candles_count_closed_minutes_not_yet_committed(data_dir: Path) -> None:
    """A 5m forming bar counts every closed minute of its bucket at once, even while the
    closes wait in the batch: its volume never goes down within a bucket."""
    folder = data_dir / "klines_1m_5m" / "futures_um"
    one = read_kline_csv(folder / "BTCUSDT-1m-2025-07-06_2025-07-12.csv")[:10]
    five = read_kline_csv(folder / "BTCUSDT-5m-2025-07-06_2025-07-12.csv")[:2]
    driver = Driver(make_core(head=one[0].candle_time - 60), {BTC: {}})
    five_id = "binance:futures:BTC/USDT:5m"
    for minute in one:
        driver.send(forming_of(BTC, minute, 1_000))
        driver.send(forming_of(BTC, minute, 59_000))
        driver.send(close_of(BTC, minute))
    assert driver.committed == []  # all still waiting for a commit
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
    assert driver.fills == [FillRequest(T0 + 600, T0 + 1200, "reconnect")]
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
    # minute 8 is held until REST answered for 5..7
    # (by the time minute 8 closes, minute 7's close is late too)
    assert driver.fills[0] == FillRequest(T0 + 300, T0 + 480, "late_close")
    assert driver.times() == [] and driver.core.held_count() >= 1
    driver.answer()
    driver.commit()
    assert driver.candles() == list(truth.values())
    assert driver.absent == 3 and driver.core.trackers[BTC].unresolved == ()


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
    # 3 queued + the 7 minutes of BTC's fill in flight: ETH's waits for it
    assert driver.fills == [FillRequest(T0 + 180, T0 + 600, "reconnect")]
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


def test_held_candles_go_over_the_hole_when_rest_keeps_failing_and_the_hole_is_retried() -> None:
    """Nothing received is lost: with REST failing, the candles held above a hole are
    queued after hold_max_s with the hole recorded (on the first candle above it); a later
    retry brings the missing minute and the last candle it brings forgets the record."""
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
    assert [i.released.reason for i in driver.committed] == ["retry", "retry"]
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
    assert [i.holes for i in driver.committed] == [()]


def test_a_retry_with_nothing_queued_has_its_holes_stored_on_their_own() -> None:
    hole = (T0, T0 + 180)
    core = make_core(head=T0 + 300, unresolved=(hole,))
    driver = Driver(core, {BTC: truth_of(10, missing=range(3))})
    driver.send(forming_of(BTC, bar(T0 + 360), LATE_S * 1000 + 1))
    driver.answer()
    assert driver.absent == 3 and driver.saved_holes == {BTC: ()}
    assert core.holes_to_save(BTC) == ()


def test_a_failed_fill_is_asked_again_after_a_backoff() -> None:
    policy = IngestPolicy(fill_retry_base_s=0.0, fill_retry_cap_s=0.0)
    truth = truth_of(3)
    driver = Driver(make_core(policy=policy), {BTC: truth}, rest_up=False)
    driver.send(close_of(BTC, truth[T0 + 120]))
    driver.answer()
    plan = driver.core.next_fills(0.0)
    assert plan.start == () and plan.wake_at == 0.1  # FILL_RETRY_MIN_S
    # the first frame of a connection: the range is asked for as a reconnect's
    assert driver.core.next_fills(0.1).start == ((BTC, FillRequest(T0, T0 + 120, "reconnect")),)


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
            released = item.released.candle
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
