"""History another process stored beside the daemon, taken into the forming bars.

``tradecanvas import`` and ``backfill`` beside a running daemon write their candles to the
store and their ``factor.rebuild`` events to its event log, which the daemon's
:class:`~tradecanvas.serve.event_tail.EventTail` reads every second. The ingest loops keep
where each series' stored history starts and its recent minutes in memory
(:class:`~tradecanvas.ingest.batcher.MinuteCache`), for the forming bars of the derived
timeframes: a bucket begun before the stored history gets none (``ingest/forming.py``).
Without this, history stored below that start counted only from the daemon's next start —
a chart's forming 1d, 1w or 1M bar stayed missing for the rest of its bucket after the
operator had filled it in.

::

    EventTail ──(another process's events)──▶ HistoryChanges.note_events
                                                 │ factor.rebuild of a series a loop ingests
                                                 ▼ (any timeframe of its symbol)
    refresh_history (one task per ingest loop) ─▶ the store: first minute, recent minutes
                                                 └▶ IngestCore.history_changed

The loop's own commits never go through here (the tail skips the daemon's own events).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import final

import trio

from tradecanvas.errors import SeriesIdError, StoreError
from tradecanvas.ingest.core import IngestCore
from tradecanvas.model import MINUTE, Candle, SeriesId
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.types import StoredEvent

log = logging.getLogger(__name__)


class Wakeup:
    """A level-triggered wake-up for one waiting task: the waiter re-checks its state after
    every wake, so a ``set()`` that lands while it is busy is never lost."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


def _symbol(series_id: str) -> tuple[str, str, str] | None:
    """Exchange, market and symbol of ``series_id`` (None: not a series id)."""
    try:
        sid = SeriesId.parse(series_id)
    except SeriesIdError:
        return None
    return sid.exchange, sid.market, sid.symbol


@final
class _Watch:
    """One ingest loop's series and those whose history changed since it last looked."""

    def __init__(self, series: Sequence[SeriesId]) -> None:
        self.by_symbol: dict[tuple[str, str, str], SeriesId] = {
            (s.exchange, s.market, s.symbol): s for s in series
        }
        self.due: dict[SeriesId, None] = {}  # in the order noted
        self.wakeup = Wakeup()

    def take(self) -> list[SeriesId]:
        due, self.due = list(self.due), {}
        return due


@final
class HistoryChanges:
    """Routes the ``factor.rebuild`` events of other processes to the ingest loops that own
    their series (a derived series' event to its base series' loop)."""

    def __init__(self) -> None:
        self._watches: list[_Watch] = []

    def note_events(self, events: Iterable[StoredEvent]) -> None:
        """Another process logged ``events`` (the event tail's callback)."""
        for event in events:
            if event.event != "factor.rebuild":
                continue
            key = _symbol(event.series_id)
            for watch in self._watches:
                sid = watch.by_symbol.get(key) if key is not None else None
                if sid is not None:
                    watch.due[sid] = None
                    watch.wakeup.set()

    @contextlib.contextmanager
    def watching(self, series: Sequence[SeriesId]) -> Iterator[_Watch]:
        """A watch of ``series`` for as long as the block runs (one ingest loop's run)."""
        watch = _Watch(series)
        self._watches.append(watch)
        try:
            yield watch
        finally:
            self._watches.remove(watch)


async def refresh_history(
    changes: HistoryChanges, series: Sequence[SeriesId], core: IngestCore, store: MarketStore
) -> None:
    """One ingest loop's task: for each of ``series`` whose history another process
    changed, read where its stored history starts and its minutes of the core's recent span
    again, and give them to ``core`` (the first minute only ever moves down; a minute the
    loop holds already is kept). A failed read is logged; the series' forming bars then
    count that history from the next start, as before."""
    with changes.watching(series) as watch:
        while True:
            await watch.wakeup.wait()
            for sid in watch.take():
                try:
                    read = await _read_history(store, sid, core.recent_span_s)
                except StoreError as exc:
                    log.warning("%s: reading the history another process stored: %s", sid, exc)
                    continue
                if read is not None and core.history_changed(sid, *read):
                    log.info(
                        "%s: history stored by another process taken into the forming bars"
                        " (the stored history starts at %d)",
                        sid,
                        read[0],
                    )


async def _read_history(
    store: MarketStore, sid: SeriesId, span_s: int
) -> tuple[int, list[Candle]] | None:
    """The store's first minute of ``sid`` and its minutes ``span_s`` below the head (None:
    nothing stored)."""
    oldest = await store.since(str(sid), -1, 1)
    head = await store.head_time(str(sid))
    if not oldest or head is None:
        return None
    stored = await store.range(str(sid), head - span_s, head + MINUTE)
    return oldest[0].candle_time, [s.candle for s in stored]


__all__ = ["HistoryChanges", "Wakeup", "refresh_history"]
