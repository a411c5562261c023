"""The event log's tail (``serve/event_tail.py``): events another process appends to the
shared store are published once, in id order, and never the daemon's own. Real SQLite files;
the "other process" is a second store opened on the same file."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.event_tail import EventTail, next_step
from tradecanvas.store.interface import MarketStore, WriteTxn
from tradecanvas.store.open import open_store
from tradecanvas.store.types import StoredEvent

SID = "binance:spot:BTC/USDT:1m"


def stored(event_id: int) -> StoredEvent:
    return StoredEvent(event_id, SID, "factor.rebuild", {"reason": "import"}, 0.0)


class Sink:
    """Records what the tail publishes (the Hub's place)."""

    def __init__(self) -> None:
        self.events: list[SystemEvent] = []
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while len(self.events) < count:
            await self._changed.wait()

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        return ()

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()
        return ()

    @property
    def ids(self) -> list[int | None]:
        return [e.event_id for e in self.events]


def rebuild(reason: str, from_time: int, to_time: int) -> dict[str, object]:
    return {"series_id": SID, "reason": reason, "from_time": from_time, "to_time": to_time}


async def append(store: MarketStore, *data: dict[str, object]) -> list[int]:
    def txn(t: WriteTxn) -> list[int]:
        return [t.append_event(SID, "factor.rebuild", d, 0.0) for d in data]

    return await store.write(txn)


# --- the pure step ------------------------------------------------------------------------


def test_own_ids_are_skipped_and_the_others_published() -> None:
    step = next_step(3, [stored(4), stored(5), stored(6)], {5}, 0)
    assert [s.event_id for s in step.publish] == [4, 6]
    assert (step.cursor, step.blocked) == (6, False)


def test_an_unknown_id_while_a_write_is_in_flight_stops_the_walk() -> None:
    step = next_step(3, [stored(4), stored(5), stored(6)], {4}, 1)
    assert ([s.event_id for s in step.publish], step.cursor, step.blocked) == ([], 4, True)


def test_before_bounds_the_walk() -> None:
    step = next_step(0, [stored(1), stored(2), stored(3)], set(), 0, before=3)
    assert ([s.event_id for s in step.publish], step.cursor) == ([1, 2], 2)


@given(st.lists(st.tuples(st.integers(1, 5), st.booleans()), max_size=30))
def test_every_id_is_published_or_own_once_in_order(reads: list[tuple[int, bool]]) -> None:
    """Whatever pages the log is read in: the others' ids come out once each, ascending."""
    ids, own, next_id = [], set(), 1
    for size, mine in reads:
        for i in range(next_id, next_id + size):
            ids.append(i)
            if mine:
                own.add(i)
        next_id += size
    cursor, published = 0, []
    log = [stored(i) for i in ids]
    while True:
        page = [s for s in log if s.event_id > cursor][:7]
        step = next_step(cursor, page, own, 0)
        published += [s.event_id for s in step.publish]
        if step.cursor == cursor:
            break
        cursor = step.cursor
    assert published == [i for i in ids if i not in own]


# --- the trio shell on a real SQLite file --------------------------------------------------


async def test_other_processes_events_are_published_once_in_order_and_own_never(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.sqlite3"
    daemon, other = await open_store(db), await open_store(db)
    try:
        await append(other, rebuild("import", 0, 60))  # before the daemon: in the log only
        sink = Sink()
        tail = EventTail(daemon, sink, cursor=1, poll_interval_s=0.01)
        own = tail.own_store()
        async with trio.open_nursery() as nursery:
            await nursery.start(tail.run)
            mine = await append(own, rebuild("backfill", 60, 120))
            theirs = await append(other, rebuild("import", 120, 180), rebuild("import", 0, 0))
            with trio.fail_after(10):
                await sink.wait_for(len(theirs))
            nursery.cancel_scope.cancel()
        assert sink.ids == theirs and mine == [2]
        assert [(e.reason, e.from_time, e.to_time) for e in sink.events] == [
            ("import", 120, 180),
            ("import", 0, 0),
        ]
        assert tail.published == 2
    finally:
        await daemon.aclose()
        await other.aclose()


async def test_an_own_write_above_unpublished_ids_returns_after_they_are_published(
    tmp_path: Path,
) -> None:
    """Between two polls, the daemon's own write that lands above another process's event
    publishes that one first, so a subscriber's event cursor never passes it."""
    db = tmp_path / "m.sqlite3"
    daemon, other = await open_store(db), await open_store(db)
    try:
        sink = Sink()
        tail = EventTail(daemon, sink, cursor=0, poll_interval_s=3600)
        async with trio.open_nursery() as nursery:
            await nursery.start(tail.run)  # it read the log; the next read is an hour off
            theirs = await append(other, rebuild("import", 0, 60))
            mine = await append(tail.own_store(), rebuild("backfill", 60, 120))
            assert sink.ids == theirs  # published before the own write returned
            assert tail.cursor == theirs[-1] and mine == [theirs[-1] + 1]
            # the tail later skips the own one
            await tail._catch_up()
            assert sink.ids == theirs and tail.cursor == mine[0]
            nursery.cancel_scope.cancel()
    finally:
        await daemon.aclose()
        await other.aclose()


async def test_a_failed_own_write_leaves_its_id_to_whoever_commits_it(tmp_path: Path) -> None:
    """A rolled-back id is handed out again: the other process's event with it is published."""
    db = tmp_path / "m.sqlite3"
    daemon, other = await open_store(db), await open_store(db)
    try:
        sink = Sink()
        tail = EventTail(daemon, sink, cursor=0)

        def fails(txn: WriteTxn) -> None:
            txn.append_event(SID, "factor.rebuild", rebuild("backfill", 0, 60), 0.0)
            raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            await tail.own_store().write(fails)
        theirs = await append(other, rebuild("import", 0, 60))
        await tail._catch_up()
        assert sink.ids == theirs == [1]
    finally:
        await daemon.aclose()
        await other.aclose()


async def test_a_tail_not_started_publishes_nothing(tmp_path: Path) -> None:
    """An ingest standby's tail is not started: its own writes only note their ids."""
    db = tmp_path / "m.sqlite3"
    daemon, other = await open_store(db), await open_store(db)
    try:
        sink = Sink()
        tail = EventTail(daemon, sink, cursor=0)
        await append(other, rebuild("import", 0, 60))
        mine = await append(tail.own_store(), rebuild("backfill", 60, 120))
        assert sink.ids == [] and tail.cursor == 0 and mine == [2]
    finally:
        await daemon.aclose()
        await other.aclose()
