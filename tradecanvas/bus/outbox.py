"""The publisher's outbox: what the pipeline committed, waiting for Redis (pure core, no I/O).

The pipeline hands over closed candles, system events and forming candles synchronously;
the publisher's one sending task takes them per tick as one batch (pipelined XADDs, then the
forming PUBLISHes) and reports each entry's answer back:

- ``ok``: Redis appended it. ``refused``: Redis said the ID is at or below the stream's top,
  so the stream is already past it — published before (a retry after a lost reply, a
  restarted ingest node, an active-active twin) or a backfill below the head: settled, not an
  error. ``blocked``: refused below a stream top no writer of ours made (``bus/refusals.py``):
  not published, counted; the stream's known top stays, so the next entry is sent (and
  appended once the stream is repaired). ``failed``: any other answer for that entry:
  dropped and counted (edges fill it from the store by the ID rule); the batch as a whole
  failing (connection lost) settles nothing and everything is sent again after the
  reconnect.
- An entry at or below what this outbox already knows the stream holds is settled at once.
- The order of a batch is the order of arrival, except that each stream's own entries are
  put in ascending ID order (in the places its entries hold), so a candle that arrives late
  still goes before a newer one of the same batch. A series' candles thus go before the
  events the same commit raised, as in the single process.
- The backlog is bounded (``max_backlog``): past it the oldest entry is dropped and counted.
  Nothing is lost by that — every entry is committed before it gets here, and an edge fills
  a hole in a stream from the store — it only bounds memory while Redis is away.
- Forming candles: the newest per series, sent at most once (not retried).
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Sequence
from typing import Final, NamedTuple

import attrs

from tradecanvas.bus.ids import ZERO, StreamId

DEFAULT_MAX_BACKLOG: Final = 200_000


class Answer(enum.Enum):
    OK = "ok"
    REFUSED = "refused"  # at or below the stream's top: already published
    FAILED = "failed"  # another error for this entry; dropped, edges fill from the store
    # refused below a foreign top (bus/refusals.py): not published, counted; edges fill it
    # from the store once the stream takes entries again
    BLOCKED = "blocked"


class Entry(NamedTuple):
    """One XADD (a tuple: one is made per candle)."""

    stream: str
    entry_id: StreamId
    payload: bytes
    events: bool = False  # the events stream (another MAXLEN)


@attrs.frozen
class Batch:
    entries: tuple[Entry, ...]
    forming: tuple[bytes, ...]

    def __bool__(self) -> bool:
        return bool(self.entries or self.forming)


@attrs.frozen
class OutboxStatistics:
    backlog: int
    appended: int
    already_published: int
    dropped: int
    failed: int
    forming_sent: int
    blocked: int


class Outbox:
    """Entries not yet answered by Redis, and what each stream is known to hold."""

    def __init__(self, max_backlog: int = DEFAULT_MAX_BACKLOG) -> None:
        if max_backlog < 1:
            raise ValueError("max_backlog must be >= 1")
        self.max_backlog = max_backlog
        # (stream, id) → entry, in order of arrival (a replaced payload keeps its place)
        self._pending: dict[tuple[str, StreamId], Entry] = {}
        self._forming: dict[str, bytes] = {}
        # the highest ID each stream is known to hold (appended or refused)
        self._top: dict[str, StreamId] = {}
        self._appended = self._already = self._dropped = self._failed = self._forming_sent = 0
        self._blocked = 0

    def statistics(self) -> OutboxStatistics:
        return OutboxStatistics(
            backlog=len(self._pending),
            appended=self._appended,
            already_published=self._already,
            dropped=self._dropped,
            failed=self._failed,
            forming_sent=self._forming_sent,
            blocked=self._blocked,
        )

    @property
    def backlog(self) -> int:
        return len(self._pending)

    def known_top(self, stream: str) -> StreamId:
        return self._top.get(stream, ZERO)

    def add(self, entry: Entry) -> bool:
        """Queue ``entry``; False when it is settled at once: at or below the known top
        (the ID 0-0, which Redis never accepts, is below every stream's top)."""
        if entry.entry_id <= self.known_top(entry.stream):
            self._already += 1
            return False
        key = (entry.stream, entry.entry_id)
        self._pending[key] = entry  # a newer payload for a pending ID (a revision) wins
        while len(self._pending) > self.max_backlog:
            del self._pending[next(iter(self._pending))]
            self._dropped += 1
        return True

    def add_forming(self, series_id: str, payload: bytes) -> None:
        self._forming[series_id] = payload

    def has_work(self) -> bool:
        return bool(self._pending or self._forming)

    def take(self, max_entries: int) -> Batch:
        """The next batch: up to ``max_entries`` pending entries (they stay pending until
        :meth:`settle`) and every forming candle (sent once, whatever happens)."""
        entries = list(itertools.islice(self._pending.values(), max_entries))
        places: dict[str, list[int]] = {}
        for index, entry in enumerate(entries):
            places.setdefault(entry.stream, []).append(index)
        ordered = list(entries)
        for indexes in places.values():
            by_id = sorted((entries[i] for i in indexes), key=lambda e: e.entry_id)
            for index, entry in zip(indexes, by_id, strict=True):
                ordered[index] = entry
        forming = tuple(self._forming.values())
        self._forming.clear()
        self._forming_sent += len(forming)
        return Batch(tuple(ordered), forming)

    def settle(self, batch: Batch, answers: Sequence[Answer]) -> None:
        """Record Redis's answer to each entry of ``batch`` (in its order)."""
        for entry, answer in zip(batch.entries, answers, strict=True):
            key = (entry.stream, entry.entry_id)
            if self._pending.get(key) is entry:
                del self._pending[key]
            if answer is Answer.FAILED:
                self._failed += 1
                continue
            if answer is Answer.BLOCKED:
                self._blocked += 1
                continue
            if answer is Answer.OK:
                self._appended += 1
            else:
                self._already += 1
            if entry.entry_id > self.known_top(entry.stream):
                self._top[entry.stream] = entry.entry_id
