"""HistoryChanges and refresh_history: another process's ``factor.rebuild`` events reach the
ingest loop that owns their series — a derived series' event its base series' loop — and
nothing else does; the loop reads back only what they touch, and a revision of a minute it
caches replaces the cached one (unless the loop wrote that minute again meanwhile). Real
SQLite stores; the other process is a second connection committing through IngestPipeline,
whose events are read from the log as the EventTail reads them. The refresh end to end
(``serve`` and ``backfill`` beside it) is in tests/store_pg/test_import_live.py."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import cast

import attrs
import trio
import trio.testing

from tests.conftest import candle, flat_minutes
from tests.ingest.driver import BTC, ETH, make_core
from tests.ingest.rig import RecordingHub
from tradecanvas.ingest.core import IngestCore
from tradecanvas.ingest.history_refresh import HistoryChanges, refresh_history
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.types import StoredCandle, StoredEvent

SPOT_BTC = SeriesId.parse("binance:spot:BTC/USDT:1m")
SOL = SeriesId.parse("binance:futures:SOL/USDT:1m")
JULY = 1_751_328_000  # 2025-07-01 00:00 UTC
HOUR = 1_751_760_000  # 2025-07-06 00:00 UTC
DAY = 86_400


def event(series_id: str, kind: str = "factor.rebuild", span: object = None) -> StoredEvent:
    data: dict[str, object] = {"reason": "import"}
    if isinstance(span, tuple):
        data.update(from_time=span[0], to_time=span[1])
    return StoredEvent(1, series_id, kind, data, 0.0)


def test_a_rebuild_reaches_the_loop_of_its_symbol_only() -> None:
    changes = HistoryChanges()
    with changes.watching([BTC, ETH]) as futures, changes.watching([SPOT_BTC]) as spot:
        changes.note_events(
            [
                event("binance:futures:ETH/USDT:5m"),  # a derived series: its base's loop
                event("binance:futures:BTC/USDT:1m"),
                event("binance:futures:ETH/USDT:1m"),
                event("binance:futures:SOL/USDT:1m"),  # nobody's
                event("binance:futures:BTC/USDT:1m", "gap"),  # not a history change
                event("not a series"),
            ]
        )
        assert [sid for sid, _ in futures.take()] == [ETH, BTC] and futures.take() == []
        assert spot.take() == []
        changes.note_events([event("binance:spot:BTC/USDT:1d")])
        assert [sid for sid, _ in spot.take()] == [SPOT_BTC] and futures.take() == []


def test_the_ranges_noted_are_base_minutes_coalesced() -> None:
    """Adjacent and overlapping ranges merge; a derived bar's range covers its buckets'
    minutes (to the month's last) and counts only when no base event came with it (the base
    event says which minutes changed); an event without a range asks for everything."""
    changes = HistoryChanges()
    with changes.watching([BTC, ETH, SOL]) as watch:
        changes.note_events(
            [
                event(str(BTC), span=(HOUR + 600, HOUR + 900)),
                event("binance:futures:BTC/USDT:5m", span=(HOUR + 600, HOUR + 900)),
                event("binance:futures:BTC/USDT:1M", span=(JULY, JULY)),
                event(str(BTC), span=(HOUR, HOUR + 540)),  # touches the first
                event(str(BTC), span=(HOUR + 7200, HOUR + 7200)),
                event("binance:futures:ETH/USDT:1h", span=(HOUR, HOUR + 3600)),
                event("binance:futures:ETH/USDT:1M", span=(JULY, JULY)),
                event("binance:futures:SOL/USDT:1h", span=(HOUR, HOUR)),
                event("binance:futures:SOL/USDT:1d"),  # no range
            ]
        )
        due = dict(watch.take())
    assert due[BTC].spans == [(HOUR, HOUR + 900), (HOUR + 7200, HOUR + 7200)]
    assert due[ETH].spans == [(JULY, JULY + 31 * DAY - 60)]  # 07-01 .. 07-31 23:59
    assert due[SOL].spans is None


def test_a_rebuild_while_no_loop_watches_is_due_to_the_next_watch() -> None:
    """A loop restarting after a crash watches nothing for a while: what another process
    changed meanwhile is due as soon as it watches again (it has loaded the store's state
    before, so only what changed since needs reading)."""
    changes = HistoryChanges()
    with changes.watching([BTC]) as watch:
        pass
    changes.note_events([event("binance:futures:BTC/USDT:1h", span=(HOUR, HOUR))])
    assert watch.take() == []  # the old watch is gone
    with changes.watching([ETH, BTC]) as watch:
        ((sid, changed),) = watch.take()
        assert sid == BTC and changed.spans == [(HOUR, HOUR + 3540)]
    with changes.watching([BTC]) as watch:
        assert watch.take() == []  # taken once


# --- the refresh task over a real SQLite store ---------------------------------------------


@attrs.define
class CountingStore:
    """The daemon's CandleStore, recording what refresh_history reads (every call goes
    through to the real store); ``gate``: ``range`` answers, then waits for it."""

    inner: CandleStore
    calls: list[tuple[str, int, int]] = attrs.Factory(list)
    in_flight: int = 0
    call_ended: trio.Event = attrs.Factory(trio.Event)
    answered: trio.Event = attrs.Factory(trio.Event)
    gate: trio.Event | None = None

    def _end(self) -> None:
        self.in_flight -= 1
        self.call_ended.set()
        self.call_ended = trio.Event()

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        self.calls.append(("since", since, limit))
        self.in_flight += 1
        try:
            return await self.inner.since(series_id, since, limit)
        finally:
            self._end()

    async def head_time(self, series_id: str) -> int | None:
        self.calls.append(("head_time", 0, 0))
        self.in_flight += 1
        try:
            return await self.inner.head_time(series_id)
        finally:
            self._end()

    async def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        self.calls.append(("range", start, end))
        self.in_flight += 1
        try:
            answer = await self.inner.range(series_id, start, end)
            self.answered.set()
            if self.gate is not None:
                await self.gate.wait()
            return answer
        finally:
            self._end()

    def as_store(self) -> MarketStore:
        return cast(MarketStore, self)  # refresh_history calls only the reads above

    async def settled(self) -> None:
        """Until the refresh task waits for events again (no read in flight)."""
        while True:
            await trio.testing.wait_all_tasks_blocked()
            if self.in_flight == 0:
                return
            await self.call_ended.wait()


@attrs.define
class Refresh:
    core: IngestCore
    store: CountingStore
    other: IngestPipeline  # another process (its own connection to the file)
    changes: HistoryChanges
    cursor: int = 0

    async def other_commits(self, candles: Sequence[Candle]) -> None:
        """The other process commits ``candles``; its events reach the loop as the tail's."""
        await self.other.run(IngestBatch.of(BTC, candles, "rest"))
        events = await self.store.inner.events_after(self.cursor, None, 10_000)
        self.cursor = max((e.event_id for e in events), default=self.cursor)
        self.store.calls.clear()
        self.changes.note_events(events)

    async def loop_commits(self, candles: Sequence[Candle]) -> None:
        """The loop commits ``candles`` (its own connection) and its core adds them."""
        await IngestPipeline(self.store.inner, RecordingHub(), [], "fp").run(
            IngestBatch.of(BTC, candles, "ws")
        )
        self.core.minutes.add(BTC, candles)

    def forming(self, tf: str, candle: Candle) -> Candle:
        updates = dict(self.core.forming_updates(BTC, candle))
        return updates[str(BTC.with_timeframe(Timeframe.parse(tf)))]


@asynccontextmanager
async def refreshing(
    tmp_path: Path, mine: Sequence[Candle], derived: str, *, start: bool = True
) -> AsyncIterator[Refresh]:
    """A loop's core that stored ``mine`` and caches them, its refresh task running (when
    ``start``) over the store, and another process's pipeline on the same file."""
    timeframes = [Timeframe.parse(tf) for tf in derived.split(",")]
    path = tmp_path / "market.sqlite3"
    daemon, elsewhere = await CandleStore.open(path), await CandleStore.open(path)
    try:
        await IngestPipeline(daemon, RecordingHub(), timeframes, "fp").run(
            IngestBatch.of(BTC, mine, "ws")
        )
        core = make_core(
            [BTC], head=mine[-1].candle_time, first=mine[0].candle_time, derived_timeframes=derived
        )
        core.minutes.add(BTC, mine)
        store = CountingStore(daemon)
        cursor = max((e.event_id for e in await daemon.events_after(0, None, 10_000)), default=0)
        rig = Refresh(
            core,
            store,
            IngestPipeline(elsewhere, RecordingHub(), timeframes, "fp"),
            HistoryChanges(),
            cursor,
        )
        async with trio.open_nursery() as nursery:
            if start:
                nursery.start_soon(refresh_history, rig.changes, [BTC], core, store.as_store())
            yield rig
            nursery.cancel_scope.cancel()
    finally:
        await elsewhere.aclose()
        await daemon.aclose()


async def test_a_backfill_far_below_reads_the_first_minute_not_the_cached_span(
    tmp_path: Path,
) -> None:
    """A backfill logs an event per page: one far below the cached minutes (a day and a
    minute with 1d derived) reads where the history starts, never the span again (the next
    pages, above that start, read nothing); one over the cached span reads what it
    overlaps only."""
    mine = list(flat_minutes(HOUR, 2 * 1440))  # two days, the loop's own
    async with refreshing(tmp_path, mine, "1h,1d") as rig:
        year_ago = HOUR - 365 * DAY
        for page in range(3):  # pages of 100 minutes, each with its events
            await rig.other_commits(list(flat_minutes(year_ago + page * 6000, 100, "7")))
            await rig.store.settled()
            assert rig.store.calls == ([("since", -1, 1)] if page == 0 else [])
            assert rig.core.minutes.history_start(BTC) == year_ago
        # revised minutes inside the span (the last hour but one): only they are read
        inside = HOUR + 2 * DAY - 7200
        await rig.other_commits(list(flat_minutes(inside + 600, 3, "9")))
        await rig.store.settled()
        assert rig.store.calls == [("range", inside + 600, inside + 780)]
        bar = rig.forming("1h", candle(inside + 1800, "100", "100", "100", "100"))
        assert bar.high == 100 and bar.low == 9


async def test_a_revision_of_cached_minutes_reaches_the_forming_bar(tmp_path: Path) -> None:
    """Another process revises two minutes of this hour the loop caches (``backfill
    --refetch``). The loop writes one of them again while the refresh reads (the store
    answered before the loop's write landed): the loop's stays; the other is the store's,
    and the forming 1h bar counts it as the closed bar will."""
    mine = list(flat_minutes(HOUR - 3600, 90))  # the hour before and 30 minutes of this
    async with refreshing(tmp_path, mine, "5m,1h") as rig:
        rig.store.gate = trio.Event()
        revised = [
            candle(HOUR + 600, "100", "250", "100", "100"),
            candle(HOUR + 660, "100", "300", "90", "100"),
        ]
        await rig.other_commits(revised)
        await rig.store.answered.wait()  # the refresh has the store's answer
        own = candle(HOUR + 660, "100", "101", "99", "100", "2")
        await rig.loop_commits([own])  # the loop's own write of it, newer
        rig.store.gate.set()
        await rig.store.settled()
        forming = rig.forming("1h", candle(HOUR + 1800, "100", "100", "100", "100"))
        assert forming.high == Decimal(250) and forming.low == Decimal(99)
        assert forming.volume == Decimal(32)  # 29 minutes of 1, the loop's 2, the forming 1
        assert rig.forming("5m", candle(HOUR + 720, "100", "100", "100", "100")).high == 250


async def test_a_revision_after_the_loops_own_write_wins_though_the_loop_noted_it_late(
    tmp_path: Path,
) -> None:
    """The loop's write of a minute lands in the store, then another process revises it;
    the loop's core hears of its own write only while the refresh reads (its on_committed
    late: an ambiguous COMMIT asked about, a one-by-one fallback). The store holds the
    revision, and so do the forming bars in the end (they kept the loop's, code review)."""
    mine = list(flat_minutes(HOUR - 3600, 90))
    async with refreshing(tmp_path, mine, "5m,1h") as rig:
        rig.store.gate = trio.Event()
        late = candle(HOUR + 660, "100", "101", "99", "100", "2")
        await IngestPipeline(rig.store.inner, RecordingHub(), [], "fp").run(
            IngestBatch.of(BTC, [late], "ws")
        )  # committed; the core not told yet
        await rig.other_commits([candle(HOUR + 660, "100", "300", "90", "100")])
        await rig.store.answered.wait()  # the refresh read the revision
        rig.core.minutes.add(BTC, [late])  # the loop's on_committed, late
        rig.store.gate.set()
        await rig.store.settled()
        forming = rig.forming("1h", candle(HOUR + 1800, "100", "100", "100", "100"))
        assert forming.high == Decimal(300) and forming.low == Decimal(90)
        assert [c for c in rig.store.calls if c[0] == "range"] == [
            ("range", HOUR + 660, HOUR + 720),
            ("range", HOUR + 660, HOUR + 720),
        ]


async def test_history_stored_while_the_loop_restarts_counts_once_it_watches(
    tmp_path: Path,
) -> None:
    """The loop's history starts at 00:10, so today gets no forming 1d bar. The loop is down
    (crashed, restarting) while another process backfills the day before and today's first
    ten minutes: its refresh task, once started, reads them without a new event, and today's
    forming bar counts them."""
    day = HOUR + DAY
    mine = list(flat_minutes(day + 600, 60))
    async with refreshing(tmp_path, mine, "1h,1d", start=False) as rig:
        forming = candle(day + 4200, "100", "100", "100", "100")
        assert "1d" not in {k.rsplit(":", 1)[1] for k, _ in rig.core.forming_updates(BTC, forming)}
        await rig.other_commits(list(flat_minutes(HOUR, 1450, "7")))  # nobody watches
        async with trio.open_nursery() as nursery:
            nursery.start_soon(refresh_history, rig.changes, [BTC], rig.core, rig.store.as_store())
            await rig.store.settled()
            nursery.cancel_scope.cancel()
        assert rig.core.minutes.history_start(BTC) == HOUR
        daily = rig.forming("1d", forming)
        assert daily.low == 7 and daily.volume == 71  # the ten minutes, the loop's, the forming
        # of the day before, only the cached span's part is read (a day and a minute)
        floor = mine[-1].candle_time - DAY - 60
        assert [c for c in rig.store.calls if c[0] == "range"] == [("range", floor, day + 600)]
