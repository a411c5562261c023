"""Stream names and entry IDs: the arithmetic the bus's exactly-once rests on (DESIGN §10).
Plain data, no I/O.

- One stream per series, ``{prefix}candles:{series_id}``; its entry ID is the candle's open
  time in milliseconds, ``<open_ms>-0``. Redis refuses an XADD whose ID is not above the
  stream's top, so a candle is on a stream at most once and in time order: a refusal means
  "the stream is already past it" (published before, or a backfill below the head, which
  edges learn from the store like single-process subscribers do) — when that top is one a
  writer of ours made (``bus/refusals.py``: else the stream is blocked, and said so).
- One events stream, ``{prefix}events``; the entry ID is the event log's ``event_id``,
  ``<event_id>-0``.
- Forming candles: pub/sub channel ``{prefix}forming`` (at most once).
- The batch notices, ``{prefix}batches``: one entry per published batch that appended
  anything, numbered by the counter ``{prefix}batches:count``, listing the streams it
  appended to and carrying the entries it appended (stream, ID, payload), written in the
  same script as the batch's entries. An edge waits on this one stream and takes a
  notice's entries from the notice itself, one read per batch (``bus/feed.py``); a notice
  without entries (a writer of an older version) has the edge read the streams it names;
  a number that does not follow the last one seen means notices were missed, and the edge
  reads every stream.

Redis keeps a stream's last ID when MAXLEN trims its entries and refuses IDs at or below it
still; only a restart without persistence forgets it (then edges notice a hole by the IDs,
or resynchronise from the store on reconnecting, see :mod:`tradecanvas.bus.cursors`).
"""

from __future__ import annotations

from typing import Final, NamedTuple

import attrs

from tradecanvas.errors import WireError
from tradecanvas.model import MS, Timeframe

DEFAULT_PREFIX: Final = "tradecanvas:"
# a batch notice's fields: its number, the stream keys appended to (one per line), and the
# entries appended: per entry ``<stream>\n<id>\n<payload length>\n<payload>``, joined by
# ``\n`` (the length, not a separator, ends a payload: it may hold any byte)
NOTICE_NUMBER_FIELD: Final = b"n"
NOTICE_KEYS_FIELD: Final = b"keys"
NOTICE_ENTRIES_FIELD: Final = b"entries"


class StreamId(NamedTuple):
    """A Redis stream entry ID ``<ms>-<seq>``, ordered as Redis orders them (a tuple: the
    publisher compares one per candle)."""

    ms: int
    seq: int = 0

    @classmethod
    def parse(cls, raw: bytes | str) -> StreamId:
        text = raw.decode("ascii", "replace") if isinstance(raw, bytes) else raw
        ms, sep, seq = text.partition("-")
        if not (ms.isdigit() and (not sep or seq.isdigit())):
            raise WireError("bus", f"bad stream entry id {text!r}")
        return cls(int(ms), int(seq) if sep else 0)

    def __str__(self) -> str:
        return f"{self.ms}-{self.seq}"


ZERO: Final = StreamId(0, 0)


def candle_entry_id(candle_time: int) -> StreamId:
    """The entry ID of the closed candle opening at ``candle_time`` (unix seconds)."""
    return StreamId(candle_time * MS, 0)


def candle_time_of(entry_id: StreamId) -> int:
    """The candle open time (seconds) an entry ID stands for; WireError if it stands for none."""
    if entry_id.seq != 0 or entry_id.ms % MS != 0:
        raise WireError("bus", f"stream entry id {entry_id} is not <open_ms>-0")
    return entry_id.ms // MS


def event_entry_id(event_id: int) -> StreamId:
    return StreamId(event_id, 0)


def event_id_of(entry_id: StreamId) -> int:
    if entry_id.seq != 0 or entry_id.ms < 1:
        raise WireError("bus", f"events stream entry id {entry_id} is not <event_id>-0")
    return entry_id.ms


def after_candle(candle_time: int | None) -> StreamId:
    """The XREAD position that yields the candles after ``candle_time`` (all for None)."""
    return ZERO if candle_time is None else candle_entry_id(candle_time)


def after_event(event_id: int) -> StreamId:
    return event_entry_id(event_id) if event_id > 0 else ZERO


def candles_missing_between(timeframe: Timeframe, last: int | None, next_time: int) -> bool:
    """True when bars of ``timeframe`` should exist strictly between ``last`` (delivered) and
    ``next_time`` (the next one read): the stream skipped some (trimmed away, lost in a Redis
    restart, or never put on it). ``last`` None: nothing delivered yet, nothing owed."""
    return last is not None and next_time > timeframe.next_open(last)


def events_missing_between(last: int, next_id: int) -> bool:
    """True when event ids lie strictly between ``last`` and ``next_id``. A hole may be an id
    that was never used (a rolled-back sequence value): reading it from the store then finds
    nothing, which costs one read and no message."""
    return next_id > last + 1


@attrs.frozen
class StreamKeys:
    """The Redis names under one prefix (tests use a prefix of their own)."""

    prefix: str = DEFAULT_PREFIX

    def series(self, series_id: str) -> str:
        return f"{self.prefix}candles:{series_id}"

    def series_of(self, key: bytes | str) -> str:
        """The series id of a series stream's key; WireError for another key."""
        text = key.decode() if isinstance(key, bytes) else key
        head = f"{self.prefix}candles:"
        if not text.startswith(head):
            raise WireError("bus", f"{text!r} is not a series stream under {self.prefix!r}")
        return text[len(head) :]

    @property
    def events(self) -> str:
        return f"{self.prefix}events"

    @property
    def batches(self) -> str:
        return f"{self.prefix}batches"

    @property
    def batches_count(self) -> str:
        """The number of the last batch notice (``INCR``ed with each)."""
        return f"{self.prefix}batches:count"

    @property
    def forming(self) -> str:
        return f"{self.prefix}forming"

    @property
    def lease(self) -> str:
        """The ingest lease (``bus/lease.py``): the value is the holding node's name."""
        return f"{self.prefix}ingest_lease"

    @property
    def ingest_report(self) -> str:
        """What the lease holder says of its Binance connections (``bus/ingest_report.py``)."""
        return f"{self.prefix}ingest_report"
