"""The event log's tail: events other processes append to a shared store, published live.

``tradecanvas import`` (and ``backfill``) run as their own processes and write their
``factor.rebuild`` events (and any ``gap``) to the store's event log only. A daemon on the
same store (the SQLite file, or PostgreSQL) publishes them to its subscribers through
:class:`EventTail`:

- **Its own writes** go through :meth:`EventTail.own_store`, a :class:`~tradecanvas.store.
  interface.MarketStore` over the daemon's store that notes the event ids each committed
  transaction appended. Those the daemon publishes itself (the pipeline's ``publish``); the
  tail skips them. A write is counted *in flight* from before it starts until its ids are
  noted, so an id the tail reads that is neither noted nor past a write in flight belongs to
  another process.
- **The tail** (:meth:`EventTail.run`) reads ``events_after(cursor)`` every
  :data:`POLL_INTERVAL_S` (an indexed read of nothing when nothing was appended) and publishes
  every other process's event, as :class:`SystemEvent`, through the sink (the Hub; on role
  ``ingest`` the bus publisher): each once, in ``event_id`` order. The cursor starts at the
  log's last id when the daemon starts; what was appended while no daemon ran is in the log
  for ``events_after`` cursors and ``GET /api/market/events``. A sink that knows what is
  published already (:class:`KnowsPublished`: the bus publisher, whose events stream the
  previous lease holder wrote) moves the cursor up to that when the tail starts — an ingest
  node taking the lease over, maybe hours after its own start, does not publish again what
  the previous holder did — if the log holds that id (else, say a Redis that lost the
  stream, or an id no event has, it starts where it would have).
- **A restored store.** When the tail starts it also compares the events stream's last id
  (read first) with the store's event counter (read after it): a stream ahead of the log
  means the store was restored from an older backup, or the bus is another store's — the
  log hands out the stream's ids again and Redis refuses them as published. The sink's
  :class:`~tradecanvas.bus.events_ahead.EventsAhead` logs it at ERROR and takes the
  ingest's ``/readyz`` down; while it stands the tail reads the top again every
  :data:`~tradecanvas.bus.events_ahead.RECHECK_S` to see the repair.
- **Order with its own events.** Event ids are handed out in commit order on both backends
  (SQLite has one writer; PostgreSQL's counter row is locked to the commit). When a write of
  the daemon's own appended events above ids it has not published yet, that write returns
  only after the tail has published those (:meth:`_catch_up`), so the pipeline's own events
  go out after every older event, and a subscriber's event cursor never passes an event it
  has yet to get.

The decision per read is the pure :func:`next_step`; the trio shell holds the cursor.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Final, Protocol, TypeVar, final, runtime_checkable

import attrs
import trio

from tradecanvas.bus.events_ahead import RECHECK_S, EventsAhead
from tradecanvas.errors import StoreError
from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.pipeline.publish import PublishTarget
from tradecanvas.store.interface import MarketStore, WriteTxn
from tradecanvas.store.types import Source, StoredCandle, StoredEvent, UpsertOutcome
from tradecanvas.store.wrapped import WrappedStore

log = logging.getLogger(__name__)
T = TypeVar("T")

# how often the tail looks for events another process appended (a read of nothing, usually)
POLL_INTERVAL_S: Final = 1.0
# events per read
PAGE: Final = 1000


@runtime_checkable
class KnowsPublished(Protocol):
    """A sink that can say up to which event id the log is published already (None: it
    cannot say now), and keeps whether that runs ahead of the log:
    ``bus.publisher.BusPublisher``."""

    events_ahead: EventsAhead

    async def published_event_id(self) -> int | None: ...


@attrs.frozen
class TailStep:
    """What to do with one read of the log (:func:`next_step`)."""

    publish: tuple[StoredEvent, ...]  # another process's events, ascending
    cursor: int  # the new cursor: every id up to it is dealt with
    blocked: bool  # stopped at an id a write in flight may hold: read again once it ends


def next_step(
    cursor: int,
    read: Sequence[StoredEvent],
    own: set[int] | frozenset[int],
    writes_in_flight: int,
    *,
    before: int | None = None,
) -> TailStep:
    """Walk ``read`` (ascending, all after ``cursor``): the daemon's own ids are skipped,
    the others published; an id not known as own while a write of the daemon's is in flight
    stops the walk (that write may hold it). ``before``: stop below this id."""
    publish: list[StoredEvent] = []
    for stored in read:
        event_id = stored.event_id
        if before is not None and event_id >= before:
            break
        if event_id not in own:
            if writes_in_flight:
                return TailStep(tuple(publish), cursor, blocked=True)
            publish.append(stored)
        cursor = event_id
    return TailStep(tuple(publish), cursor, blocked=False)


@final
class EventTail:
    """Publishes the event-log entries other processes append (module docstring)."""

    def __init__(
        self,
        store: MarketStore,
        sink: PublishTarget,
        *,
        cursor: int,
        poll_interval_s: float = POLL_INTERVAL_S,
    ) -> None:
        self.store = store
        self.sink = sink
        self.cursor = cursor
        self.poll_interval_s = poll_interval_s
        self.published = 0  # other processes' events published
        self._own: set[int] = set()
        self._in_flight = 0
        self._settled = trio.Event()
        self._lock = trio.Lock()
        self._failing = False
        self._running = False  # run() started (not on a standby): own writes catch up too
        # told of every other process's events it publishes (the ingest's HistoryChanges)
        self.on_foreign: Callable[[Sequence[StoredEvent]], None] | None = None

    def own_store(self, store: MarketStore | None = None) -> MarketStore:
        """``store`` (default: the tail's) with every write's event ids noted as own."""
        return OwnWrites(self, self.store if store is None else store)

    # --- the daemon's own writes ---------------------------------------------------------

    async def _own_write(
        self, inner: MarketStore, fn: Callable[[WriteTxn], T], *, quick: bool
    ) -> T:
        appended: list[int] = []
        self._in_flight += 1
        try:
            result = await inner.write(lambda txn: fn(_NotingTxn(txn, appended)), quick=quick)
            # committed: these ids are the daemon's (a rolled-back id may come back, to anyone)
            self._own.update(i for i in appended if i > self.cursor)
        finally:
            self._in_flight -= 1
            self._settled.set()
            self._settled = trio.Event()
        if self._running and appended and min(appended) > self.cursor + 1:
            await self._catch_up(before=min(appended))
        return result

    # --- the tail --------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish other processes' events until cancelled. A failed read is logged and
        tried again at the next poll (the write path reports a broken store)."""
        self._running = True
        async with self._lock:  # the daemon's own writes wait for where the tail starts
            await self._skip_published()
        await self._catch_up()
        task_status.started()  # caught up with the log as it was
        recheck_at = trio.current_time() + RECHECK_S
        while True:
            await trio.sleep(self.poll_interval_s)
            sink = self.sink
            ahead = isinstance(sink, KnowsPublished) and sink.events_ahead.found is not None
            if ahead and trio.current_time() >= recheck_at:
                recheck_at = trio.current_time() + RECHECK_S
                await self._stream_top()  # the repair clears it
            await self._catch_up()

    async def _stream_top(self) -> int | None:
        """The events stream's last event id (None: not known now), checked against the
        store's event counter, read after it (module docstring, "A restored store")."""
        if not isinstance(self.sink, KnowsPublished):
            return None
        top = await self.sink.published_event_id()
        if top is None:
            return None
        try:
            newest = await self.store.events_newest_id()
        except StoreError:
            return None  # the catch-up reports it
        if self.sink.events_ahead.check(top, newest):
            return None  # the log does not hold it: start where the tail would have
        return top

    async def _skip_published(self) -> None:
        """Move the cursor up to what the sink says is published, if the log holds it."""
        top = await self._stream_top()
        if top is None or top <= self.cursor:
            return
        try:
            found = await self.store.events_after(top - 1, limit=1)
        except StoreError:
            return  # the catch-up reports it
        if found and found[0].event_id == top:
            log.info(
                "event log tail: events %d..%d are published already; starting after them",
                self.cursor + 1,
                top,
            )
            self.cursor = top
            self._own = {i for i in self._own if i > top}

    async def _catch_up(self, *, before: int | None = None) -> None:
        """Publish the other processes' events after the cursor (below ``before``)."""
        while True:
            settled = self._settled
            try:
                async with self._lock:
                    step = await self._advance(before)
            except StoreError as exc:
                if not self._failing:
                    log.warning("event log tail: reading the store failed (%s); retrying", exc)
                self._failing = True
                return
            if self._failing:
                log.info("event log tail: reading the store again")
                self._failing = False
            if step is None:
                return
            await settled.wait()  # a write of the daemon's ended: read again

    async def _advance(self, before: int | None) -> TailStep | None:
        """Read and publish pages until the log (or ``before``) is reached; the blocking
        step when a write in flight stopped it (None: done)."""
        while before is None or self.cursor + 1 < before:
            read = await self.store.events_after(self.cursor, limit=PAGE)
            step = next_step(self.cursor, read, self._own, self._in_flight, before=before)
            for stored in step.publish:
                self.sink.publish_system(SystemEvent.from_stored(stored))
            if step.publish and self.on_foreign is not None:
                self.on_foreign(step.publish)
            if len(step.publish) == 1:
                stored = step.publish[0]
                log.info(
                    "event %d from another process published: %s %s",
                    stored.event_id,
                    stored.series_id,
                    stored.event,
                )
            elif step.publish:  # one line a page (a standby taking over publishes its backlog)
                log.info(
                    "events %d..%d (%d) from another process published",
                    step.publish[0].event_id,
                    step.publish[-1].event_id,
                    len(step.publish),
                )
            self.published += len(step.publish)
            if step.cursor != self.cursor:
                self.cursor = step.cursor
                self._own = {i for i in self._own if i > step.cursor}
            if step.blocked:
                return step
            if len(read) < PAGE or (before is not None and step.cursor < read[-1].event_id):
                return None
        return None


@final
class _NotingTxn:
    """A WriteTxn that notes the ids of the events it appends."""

    __slots__ = ("appended", "txn")

    def __init__(self, txn: WriteTxn, appended: list[int]) -> None:
        self.txn = txn
        self.appended = appended

    def append_event(
        self, series_id: str, event: str, data: Mapping[str, object], created_at: float
    ) -> int:
        event_id = self.txn.append_event(series_id, event, data, created_at)
        self.appended.append(event_id)
        return event_id

    def upsert(
        self, series_id: str, candles: Sequence[Candle], source: Source, *, complete: bool = True
    ) -> list[UpsertOutcome]:
        return self.txn.upsert(series_id, candles, source, complete=complete)

    @property
    def sequence(self) -> int:
        return self.txn.sequence

    def write_rows(self, rows: Sequence[tuple[str, StoredCandle]]) -> None:
        self.txn.write_rows(rows)

    def first_time(self, series_id: str) -> int | None:
        return self.txn.first_time(series_id)

    def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        return self.txn.range(series_id, start, end)

    def last_before(self, series_id: str, t: int) -> StoredCandle | None:
        return self.txn.last_before(series_id, t)

    def head_time(self, series_id: str) -> int | None:
        return self.txn.head_time(series_id)

    def heads_of(self, series_ids: Collection[str]) -> dict[str, int]:
        return self.txn.heads_of(series_ids)

    def prune_events(self, keep: int, created_after: float) -> int:
        return self.txn.prune_events(keep, created_after)

    def get_meta(self, key: str) -> str | None:
        return self.txn.get_meta(key)

    def set_meta(self, key: str, value: str) -> None:
        self.txn.set_meta(key, value)


@final
class OwnWrites(WrappedStore):
    """A MarketStore whose writes note their event ids with the tail; all else is the
    wrapped store's."""

    def __init__(self, tail: EventTail, inner: MarketStore) -> None:
        super().__init__(inner)
        self.owner = tail

    async def write(self, fn: Callable[[WriteTxn], T], *, quick: bool = False) -> T:
        return await self.owner._own_write(self.inner, fn, quick=quick)


__all__ = [
    "PAGE",
    "POLL_INTERVAL_S",
    "EventTail",
    "KnowsPublished",
    "OwnWrites",
    "TailStep",
    "next_step",
]
