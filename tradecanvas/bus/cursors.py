"""An edge's cursors on the bus: exactly once, in order, holes filled (pure core, no I/O).

The edge reads each series stream and the events stream from its own last IDs. This core
decides, for what a read returned:

- **Closed candles**: each series' cursor is the newest ``candle_time`` delivered. A candle at
  or below it is not delivered again. When the next candle read is beyond the bar after the
  cursor (:func:`~tradecanvas.bus.ids.candles_missing_between`), the stream lost some —
  trimmed by ``MAXLEN ~`` while the edge was behind, forgotten by a Redis restart, dropped
  from a full outbox — so :meth:`EdgeCursors.runs` puts a :class:`CandleGap` before that
  candle and the shell fills it from the store (every candle on a stream was committed
  before it was added, so the store has whatever the hole held). A hole the exchange itself
  has is a fill that finds nothing: one read, no message.
- **Events**: the cursor is the newest ``event_id`` delivered; ids are strictly increasing,
  so a jump is an :class:`EventGap`, filled from the event log.
- **A series nobody follows** on this edge: :meth:`EdgeCursors.pass_over` moves its cursor
  past what was read by the last entry's ID, nothing decoded (its subscribers to come catch
  up from the store, which holds every entry a stream got; see ``bus/feed.py``).
- **After each (re)connect** the stream may have lost its tail with nobody left to notice
  (no later entry will reveal the hole before the next bar): :meth:`EdgeCursors.resync`
  lists an open-ended fill per series and for the events.
- **Forming candles** (pub/sub, at most once) may overtake the closes on the stream: one for
  bar *t* is passed on only when the series' cursor has reached the bar before *t*
  (DESIGN §10: candle times never go backwards for a subscriber); until then the newest one
  is held and released by :meth:`EdgeCursors.accept`. One at or below the cursor is stale
  and dropped.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import attrs

from tradecanvas.bus.ids import (
    StreamId,
    after_candle,
    after_event,
    candle_time_of,
    candles_missing_between,
    events_missing_between,
)
from tradecanvas.errors import WireError
from tradecanvas.model import Candle, SeriesId, Timeframe


@attrs.frozen
class CandleGap:
    """Candles of ``series_id`` with ``after < candle_time < before`` (no bound for None)
    that the stream did not bring: read them from the store."""

    series_id: str
    after: int | None
    before: int | None


@attrs.frozen
class EventGap:
    """Events with ``after < event_id < before`` (no upper bound for None)."""

    after: int
    before: int | None


@attrs.frozen
class Run:
    """Candles to deliver in order, after the gap before them (if any) is filled."""

    gap: CandleGap | None
    candles: tuple[Candle, ...]


@attrs.frozen
class EventRun:
    gap: EventGap | None
    event_ids: tuple[int, ...]  # the positions of the events read, in order


class EdgeCursors:
    """The cursors of one edge: per series the newest ``candle_time`` delivered, and the
    newest ``event_id``; the forming candles held back."""

    def __init__(self, series: Mapping[str, int | None], events_after: int) -> None:
        self._timeframes = {sid: SeriesId.parse(sid).timeframe for sid in series}
        self._cursors: dict[str, int | None] = dict(series)
        self.events_after = events_after
        self._held: dict[str, Candle] = {}
        # the newest entry ID read from each stream (series id, or None for the events): a
        # malformed entry is read past without moving the cursor, so the next one shows a
        # hole that the store fills, and XREAD never returns the bad one again
        self._read: dict[str | None, StreamId] = {}
        # the streams (series id, None: the events) whose read position may have moved
        # since :meth:`moved_positions` last said: the feed updates only those in the
        # arguments of its next XREAD, not every stream's
        self._moved: set[str | None] = {*self._cursors, None}

    @property
    def series_ids(self) -> tuple[str, ...]:
        return tuple(self._cursors)

    def cursor(self, series_id: str) -> int | None:
        return self._cursors[series_id]

    def timeframe(self, series_id: str) -> Timeframe:
        return self._timeframes[series_id]

    def note_read(self, series_id: str | None, entry_id: StreamId) -> None:
        """An entry was read from ``series_id``'s stream (None: the events stream)."""
        current = self._read.get(series_id)
        if current is None or entry_id > current:
            self._read[series_id] = entry_id
            self._moved.add(series_id)

    def read_position(self, series_id: str) -> StreamId:
        """Where the next XREAD of ``series_id``'s stream starts: past the cursor (a fill may
        have moved it beyond what was read) and past every entry read."""
        cursor = after_candle(self._cursors[series_id])
        return max(cursor, self._read.get(series_id, cursor))

    def read_positions(self) -> dict[str, StreamId]:
        """Series id → :meth:`read_position`."""
        return {sid: self.read_position(sid) for sid in self._cursors}

    def events_position(self) -> StreamId:
        position = after_event(self.events_after)
        return max(position, self._read.get(None, position))

    def moved_positions(self) -> dict[str | None, StreamId]:
        """The read position of each stream (series id; None: the events stream) that may
        have moved since the last call — every stream on the first call. The others are
        where this said last time: the feed updates only these in its XREAD's arguments."""
        moved, self._moved = self._moved, set()
        return {
            sid: self.events_position() if sid is None else self.read_position(sid) for sid in moved
        }

    # --- closed candles ----------------------------------------------------------------

    def runs(self, series_id: str, candles: Iterable[Candle]) -> list[Run]:
        """Split what a read returned for ``series_id`` (ascending) into runs without holes,
        each after the gap before it. Candles at or below the cursor are left out."""
        timeframe = self._timeframes[series_id]
        last = self._cursors[series_id]
        result: list[Run] = []
        current: list[Candle] = []
        gap: CandleGap | None = None
        for candle in candles:
            t = candle.candle_time
            if last is not None and t <= last:
                continue
            if candles_missing_between(timeframe, last, t):
                if current or gap is not None:
                    result.append(Run(gap, tuple(current)))
                current, gap = [], CandleGap(series_id, last, t)
            current.append(candle)
            last = t
        if current or gap is not None:
            result.append(Run(gap, tuple(current)))
        return result

    def accept(
        self, series_id: str, candles: Iterable[Candle], *, before: int | None = None
    ) -> list[Candle]:
        """The candles to deliver now, ascending and above the cursor (and below
        ``before``, for a fill); the cursor moves to the newest of them."""
        cursor = self._cursors[series_id]
        by_time = {
            c.candle_time: c
            for c in candles
            if (cursor is None or c.candle_time > cursor)
            and (before is None or c.candle_time < before)
        }
        fresh = [by_time[t] for t in sorted(by_time)]
        if fresh:
            self._cursors[series_id] = fresh[-1].candle_time
            self._moved.add(series_id)
        return fresh

    def pass_over(self, series_id: str, entry_id: StreamId) -> bool:
        """The entries of ``series_id``'s stream up to ``entry_id`` (the last one read) are
        read and not delivered: nobody on this edge follows the series (``bus/feed.py``).
        The read position and the cursor move past them, by the ID alone (``<open_ms>-0``:
        the bar it holds), so no hole is owed for them or for one among them. False, and
        nothing moves, when the ID stands for no bar: the caller decodes the entries."""
        try:
            candle_time = candle_time_of(entry_id)
        except WireError:
            return False
        self.note_read(series_id, entry_id)
        cursor = self._cursors[series_id]
        if cursor is None or candle_time > cursor:
            self._cursors[series_id] = candle_time
            self._moved.add(series_id)
        return True

    def resync(self) -> list[CandleGap]:
        """After a (re)connect: read from the store whatever is after each cursor."""
        return [CandleGap(sid, c, None) for sid, c in self._cursors.items()]

    # --- events ------------------------------------------------------------------------

    def event_runs(self, event_ids: Iterable[int]) -> list[EventRun]:
        """As :meth:`runs`, for the events stream's ids (ascending)."""
        last = self.events_after
        result: list[EventRun] = []
        current: list[int] = []
        gap: EventGap | None = None
        for event_id in event_ids:
            if event_id <= last:
                continue
            if events_missing_between(last, event_id):
                if current or gap is not None:
                    result.append(EventRun(gap, tuple(current)))
                current, gap = [], EventGap(last, event_id)
            current.append(event_id)
            last = event_id
        if current or gap is not None:
            result.append(EventRun(gap, tuple(current)))
        return result

    def accept_events(self, event_ids: Sequence[int], *, before: int | None = None) -> list[int]:
        """Of ``event_ids`` (any order), those to deliver now, ascending; the cursor moves."""
        fresh = sorted(
            {e for e in event_ids if e > self.events_after and (before is None or e < before)}
        )
        if fresh:
            self.events_after = fresh[-1]
            self._moved.add(None)
        return fresh

    def resync_events(self) -> EventGap:
        return EventGap(self.events_after, None)

    # --- forming -----------------------------------------------------------------------

    def offer_forming(self, series_id: str, candle: Candle) -> Candle | None:
        """The forming candle to pass on now, or None (held until the closes before it are
        delivered, or stale, or a series this edge does not follow)."""
        if series_id not in self._cursors:
            return None
        cursor = self._cursors[series_id]
        if cursor is not None and candle.candle_time <= cursor:
            return None
        if cursor is None or self._timeframes[series_id].next_open(cursor) >= candle.candle_time:
            self._held.pop(series_id, None)
            return candle
        held = self._held.get(series_id)
        if held is None or held.candle_time <= candle.candle_time:
            self._held[series_id] = candle
        return None

    def release_forming(self, series_id: str) -> Candle | None:
        """The held forming candle that the cursor now allows, if any (a stale one goes)."""
        held = self._held.get(series_id)
        if held is None:
            return None
        cursor = self._cursors[series_id]
        if cursor is not None and held.candle_time <= cursor:
            del self._held[series_id]
            return None
        if cursor is None or self._timeframes[series_id].next_open(cursor) >= held.candle_time:
            del self._held[series_id]
            return held
        return None
