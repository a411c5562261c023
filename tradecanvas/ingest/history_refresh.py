"""History another process stored beside the daemon, taken into the forming bars.

``tradecanvas import`` and ``backfill`` beside a running daemon write their candles to the
store and their ``factor.rebuild`` events to its event log, which the daemon's
:class:`~tradecanvas.serve.event_tail.EventTail` reads every second. The ingest loops keep
where each series' stored history starts and its recent minutes in memory
(:class:`~tradecanvas.ingest.batcher.MinuteCache`), for the forming bars of the derived
timeframes: a bucket begun before the stored history gets none (``ingest/forming.py``).
Without this, history stored below that start counted only from the daemon's next start —
a chart's forming 1d, 1w or 1M bar stayed missing for the rest of its bucket after the
operator had filled it in — and a revision of a cached minute (``backfill --refetch``, an
import of a corrected archive) never reached the forming bar its closed bar replaces.

::

    EventTail ──(another process's events)──▶ HistoryChanges.note_events
                                                 │ factor.rebuild of a series a loop ingests
                                                 ▼ (any timeframe of its symbol): its range
    refresh_history (one task per ingest loop) ─▶ the store: what those ranges touch
                                                 └▶ MinuteCache.extend_history

**Only what the events touch is read.** Each event's range (``from_time``..``to_time``)
becomes base minutes (:class:`Changed`: a derived bar's buckets only without its base
event); the ranges noted for a series since its loop last looked are coalesced. Of the
cached span (the largest derived bucket below the newest minute: 31 days and a minute with
1M) only the part they overlap is read again, and the store's first minute only when a range
lies below where the history is known to start. A ``backfill`` of old history logs events
per REST page: the first costs a one-row read, those above the new start none — never a
re-read of the span. An event without a range re-reads all of it.

**The minutes read replace the cached ones** — a revision counts — except those the loop
added itself while the read ran (a close enqueued, a commit landed): the read may predate
them (:meth:`~tradecanvas.ingest.batcher.MinuteCache.extend_history` says why a minute still
waiting for its commit is safe to replace).

**A loop that is not watching** (restarting after a crash) misses nothing: the ranges of a
symbol no loop watches are kept (for at most :data:`UNCLAIMED_MAX` symbols) and the loop
that watches it next reads them at once, after it loaded its state from the store.

The loop's own commits never go through here (the tail skips the daemon's own events).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator, Sequence
from typing import Final, final

import trio

from tradecanvas.errors import SeriesIdError, StoreError
from tradecanvas.ingest.batcher import MinuteCache
from tradecanvas.ingest.core import IngestCore
from tradecanvas.model import MINUTE, Candle, SeriesId
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.types import StoredEvent

log = logging.getLogger(__name__)

Span = tuple[int, int]  # base minutes [first, last], open times, both included
Symbol = tuple[str, str, str]  # exchange, market, symbol

# ranges kept per series between two looks before they are merged into the one span from
# the lowest to the highest (a backfill's pages are adjacent and merge into one anyway)
RANGES_MAX: Final = 64
# symbols whose changes are kept while no loop watches them (a loop restarting)
UNCLAIMED_MAX: Final = 1024


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


def _symbol(sid: SeriesId) -> Symbol:
    return sid.exchange, sid.market, sid.symbol


def _changed(event: StoredEvent) -> tuple[Symbol, Span | None, bool] | None:
    """The symbol of a ``factor.rebuild``, the base minutes it says changed (None: it does
    not say) and whether it is the base series' own; None for any other event."""
    if event.event != "factor.rebuild":
        return None
    try:
        sid = SeriesId.parse(event.series_id)
    except SeriesIdError:
        return None
    base = sid.timeframe.seconds == MINUTE
    lo, hi = event.data.get("from_time"), event.data.get("to_time")
    if type(lo) is not int or type(hi) is not int or hi < lo:
        return _symbol(sid), None, base
    # a derived bar's range: its buckets' minutes, up to the last one's last minute
    last = hi if base else sid.timeframe.next_open(hi) - MINUTE
    return _symbol(sid), (lo, last), base


def coalesce(spans: Iterable[Span]) -> list[Span]:
    """``spans`` merged where they overlap or touch, in time order."""
    merged: list[Span] = []
    for lo, hi in sorted(spans):
        if merged and lo <= merged[-1][1] + MINUTE:
            merged[-1] = (merged[-1][0], max(merged[-1][1], hi))
        else:
            merged.append((lo, hi))
    return merged


def _bounded(spans: list[Span]) -> list[Span]:
    if len(spans) <= RANGES_MAX:
        return spans
    spans = coalesce(spans)
    if len(spans) <= RANGES_MAX:
        return spans
    return [(spans[0][0], max(hi for _, hi in spans))]


@final
class Changed:
    """What changed of one series since its loop last looked.

    A write of base minutes logs the base series' own event (with the derived bars' events
    of the same transaction, ``pipeline/events.py``; an import's one per series), which says
    exactly which minutes changed; a derived bar's event covers whole buckets (a 1M one a
    month) and only counts when no base event came with it (a ``fingerprint`` rebuild, or a
    poll that split a transaction's events): then its buckets' minutes are read."""

    def __init__(self) -> None:
        self.everything = False  # an event without a range
        self.base: list[Span] = []  # of the base series' events
        self.buckets: list[Span] = []  # of the derived series' events, as base minutes

    def note(self, span: Span | None, base: bool = True) -> None:
        if span is None:
            self.everything = True
        elif base:
            self.base.append(span)
            self.base = _bounded(self.base)
        else:
            self.buckets.append(span)
            self.buckets = _bounded(self.buckets)

    @property
    def spans(self) -> list[Span] | None:
        """The base minutes to read again, coalesced (None: all that are cached)."""
        if self.everything:
            return None
        return coalesce(self.base or self.buckets)


@final
class _Watch:
    """One ingest loop's series and what changed of them since it last looked."""

    def __init__(self, series: Sequence[SeriesId]) -> None:
        self.by_symbol: dict[Symbol, SeriesId] = {_symbol(s): s for s in series}
        self.due: dict[SeriesId, Changed] = {}  # in the order noted
        self.wakeup = Wakeup()

    def take(self) -> list[tuple[SeriesId, Changed]]:
        due, self.due = list(self.due.items()), {}
        return due


@final
class HistoryChanges:
    """Routes the ``factor.rebuild`` events of other processes to the ingest loops that own
    their series (a derived series' event to its base series' loop); keeps those of a
    symbol no loop watches for the next loop that does."""

    def __init__(self) -> None:
        self._watches: list[_Watch] = []
        self._unclaimed: dict[Symbol, Changed] = {}

    def note_events(self, events: Iterable[StoredEvent]) -> None:
        """Another process logged ``events`` (the event tail's callback)."""
        for event in events:
            changed = _changed(event)
            if changed is None:
                continue
            key, span, base = changed
            watched = False
            for watch in self._watches:
                sid = watch.by_symbol.get(key)
                if sid is not None:
                    watched = True
                    watch.due.setdefault(sid, Changed()).note(span, base)
                    watch.wakeup.set()
            if not watched:
                if key not in self._unclaimed and len(self._unclaimed) >= UNCLAIMED_MAX:
                    del self._unclaimed[next(iter(self._unclaimed))]  # the oldest noted
                self._unclaimed.setdefault(key, Changed()).note(span, base)

    @contextlib.contextmanager
    def watching(self, series: Sequence[SeriesId]) -> Iterator[_Watch]:
        """A watch of ``series`` for as long as the block runs (one ingest loop's run);
        what changed of them while nobody watched is due at once."""
        watch = _Watch(series)
        for key, sid in watch.by_symbol.items():
            kept = self._unclaimed.pop(key, None)
            if kept is not None:
                watch.due[sid] = kept
                watch.wakeup.set()
        self._watches.append(watch)
        try:
            yield watch
        finally:
            self._watches.remove(watch)


async def refresh_history(
    changes: HistoryChanges, series: Sequence[SeriesId], core: IngestCore, store: MarketStore
) -> None:
    """One ingest loop's task: for each of ``series`` whose history another process
    changed, read what the changes touch of the core's recent minutes and, when they lie
    below, where its stored history starts, and give them to ``core``'s
    :class:`~tradecanvas.ingest.batcher.MinuteCache` (the first minute only ever moves
    down; a minute read replaces the cached one unless the loop added that minute itself
    while the read ran, and such a minute is read again: the store, which the loop's write
    has reached by then, has the last word). A failed read is logged; the series' forming
    bars then count that change from the next start, as before."""
    cache = core.minutes
    with changes.watching(series) as watch:
        while True:
            await watch.wakeup.wait()
            for sid, changed in watch.take():
                with cache.noting_adds(sid) as own:
                    try:
                        read = await _read_changed(store, sid, changed, cache)
                    except StoreError as exc:
                        log.warning("%s: reading the history another process stored: %s", sid, exc)
                        continue
                # (no checkpoint since the read: ``own`` is every minute the loop added)
                if read is None:
                    continue
                if kept := sorted(own.intersection(c.candle_time for c in read[1])):
                    # the loop's write of these may have landed before the read (its
                    # on_committed is late: an ambiguous COMMIT, a one-by-one fallback), and
                    # the other process's after it: read them again, once the loop's is in
                    again = watch.due.setdefault(sid, Changed())
                    for t in kept:
                        again.note((t, t))
                    watch.wakeup.set()
                if cache.extend_history(sid, *read, own):
                    start = cache.history_start(sid)
                    log.info(
                        "%s: history stored by another process taken into the forming bars"
                        " (the stored history starts at %s)",
                        sid,
                        start,
                    )


async def _read_changed(
    store: MarketStore, sid: SeriesId, changed: Changed, cache: MinuteCache
) -> tuple[int | None, list[Candle]] | None:
    """The store's first minute of ``sid`` (None: not read, nothing ``changed`` lies below
    the cached start) and its minutes ``changed`` touches of the cached span (None: nothing
    stored)."""
    spans = changed.spans
    start = cache.history_start(sid)
    first = None
    if spans is None or start is None or any(lo < start for lo, _ in spans):
        oldest = await store.since(str(sid), -1, 1)
        if not oldest:
            return None
        first = oldest[0].candle_time
    newest = cache.newest(sid)
    if newest is None:  # nothing cached: the span below the store's head
        newest = await store.head_time(str(sid))
        if newest is None:
            return None
    floor = newest - cache.span_s
    reads = [(floor, newest)] if spans is None else spans
    stored: list[Candle] = []
    for lo, hi in reads:
        lo, hi = max(lo, floor), min(hi, newest)
        if lo <= hi:
            stored += [s.candle for s in await store.range(str(sid), lo, hi + MINUTE)]
    return first, stored


__all__ = ["Changed", "HistoryChanges", "Wakeup", "coalesce", "refresh_history"]
