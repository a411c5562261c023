"""What Redis's refusal of an XADD means: *already published*, or a stream **blocked** by an
ID above anything a tradecanvas writer puts there (pure core, no I/O; DESIGN §10).

Redis refuses an XADD whose ID is not above the stream's last ID. For the bus that normally
means the entry, or a later one, is on the stream already: a retry after a lost reply, a
restarted or second ingest node, a backfill or revision below the head. But the refusal is
the same when the stream's last ID is one no writer of ours made — an entry put there by
hand (an operator's test with ``*``), by a bad actor, by a tool with a clock mistake — and
then every later entry of that series is refused too: the series stops on every edge.

So the publisher's script answers a refusal with what the stream's top is
(:data:`TOP_OF`: its last-generated ID, and its last entry's ID and payload; each top once a
batch, however many entries it refused), and
:func:`foreign_top` tells the two apart. The top is one of ours when it is this entry's own
ID, or when its last entry is there under that ID and is an entry the bus writes: for a
series stream a candle of that open time whose bar has closed (by the wall clock, give or
take :data:`~tradecanvas.model.CLOCK_SKEW_S`, the rule of the HTTP write path); for the
events stream an event of that id. Anything else — a deleted top, a payload that is none of
ours, a bar that has not closed yet — blocks the stream.

:class:`BlockedStreams` keeps which streams are blocked (for ``/readyz`` and the metrics),
logs each blocked top once at ERROR (the stream, the offending ID and why), and a stream
that takes an entry again once at INFO.

Limit: an events stream whose top is a well-formed event with an id above the event log's
is taken as published here (event ids are no times; the publisher has no store to ask);
the ingest finds such a stream when its event tail starts and flags it
(``bus/events_ahead.py``: a store restored under a bus that kept its keys).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import attrs

from tradecanvas.bus.ids import StreamId, StreamKeys
from tradecanvas.bus.replies import candle_of, event_of
from tradecanvas.errors import WireError
from tradecanvas.model import CLOCK_SKEW_S, SeriesId
from tradecanvas.wire.bus import MAX_PAYLOAD_BYTES

log = logging.getLogger("tradecanvas.bus.publisher")

# Lua (a part of the publisher's script): what a stream's top is, for a refusal's answer —
# {last-generated ID, last entry's ID, its field, its value} (the payload cut past the cap:
# wire/bus.py's decoders refuse it unparsed), or {last-generated ID} when the stream has no
# entry left. Read once per key for the script's run and kept in ``tops``; ``top_of``
# returns its place there, which each refusal names: the script answers with ``tops`` once,
# not a copy of a top per refused entry (a 64 KiB foreign top and 2,000 refusals made a
# 128 MB reply).
TOP_OF: Final = """
local tops, top_at = {}, {}
local function top_of(key)
  if top_at[key] then
    return top_at[key]
  end
  local info = redis.call('XINFO', 'STREAM', key)
  local last, entry = '0-0', false
  for j = 1, #info, 2 do
    if info[j] == 'last-generated-id' then
      last = info[j + 1]
    elseif info[j] == 'last-entry' then
      entry = info[j + 1]
    end
  end
  local top = {last}
  if entry then
    top[2] = entry[1]
    local fields = entry[2]
    if fields[1] then
      top[3] = fields[1]
      top[4] = string.sub(fields[2], 1, MAX_PAYLOAD + 1)
    end
  end
  tops[#tops + 1] = top
  top_at[key] = #tops
  return #tops
end
""".replace("MAX_PAYLOAD", str(MAX_PAYLOAD_BYTES))


@attrs.frozen
class StreamTop:
    """A stream's top as :data:`TOP_OF` answered: its last-generated ID, and its last entry
    (None: none left) with its first field and that field's value."""

    last_id: StreamId
    entry: tuple[StreamId, bytes, bytes] | None

    @classmethod
    def parse(cls, raw: Sequence[object]) -> StreamTop:
        """WireError when ``raw`` is not :data:`TOP_OF`'s answer."""
        if not raw or not isinstance(raw[0], bytes):
            raise WireError("bus", f"unexpected answer {raw!r:.200} about a stream's top")
        last = StreamId.parse(raw[0])
        if len(raw) < 4:
            return cls(last, None)
        entry_id, field, value = raw[1:4]
        if isinstance(entry_id, bytes) and isinstance(field, bytes) and isinstance(value, bytes):
            return cls(last, (StreamId.parse(entry_id), field, value))
        raise WireError("bus", f"unexpected answer {raw!r:.200} about a stream's top")


def foreign_top(keys: StreamKeys, stream: str, top: StreamTop, now: float) -> str | None:
    """Why ``stream``'s top is no entry a tradecanvas writer made (None: it is one, so a
    refusal means already published); ``now`` is the wall clock (unix seconds)."""
    if top.entry is None or top.entry[0] != top.last_id:
        return f"its last ID {top.last_id} has no entry (deleted)"
    entry_id, field, value = top.entry
    entry = [entry_id, [field, value]]
    try:
        if stream == keys.events:
            event_of(entry, entry_id)
            return None
        candle = candle_of(entry, entry_id)
        timeframe = SeriesId.parse(keys.series_of(stream)).timeframe
    except WireError as exc:
        return f"it is no entry of ours ({exc})"
    closes = timeframe.next_open(candle.candle_time)
    if closes > now + CLOCK_SKEW_S:
        return f"its bar closes at {closes}, {closes - now:.0f} s from now"
    return None


@attrs.define
class BlockedStreams:
    """The streams whose top blocks them now (stream → its offending ID), and the entries
    they refused (module docstring)."""

    streams: dict[str, StreamId] = attrs.field(factory=dict)
    entries: int = 0  # refused by a blocked stream (total): not published

    def blocked(self, stream: str, top: StreamId, why: str) -> None:
        """An entry of ``stream`` was refused below the foreign ``top``."""
        self.entries += 1
        if self.streams.get(stream) == top:
            return
        self.streams[stream] = top
        log.error(
            "bus publisher: stream %s is blocked by entry ID %s, above anything a tradecanvas"
            " writer puts there (%s): Redis refuses every later entry of it, so its series"
            " stops on every edge. Its entries are not published (the edges fill them from"
            " the store once the stream takes entries again). Repair: delete the stream"
            " (docs/operations.md, troubleshooting)",
            stream,
            top,
            why,
        )

    def appended(self, stream: str) -> None:
        """An entry of ``stream`` was appended: it is not blocked (any more)."""
        top = self.streams.pop(stream, None)
        if top is not None:
            log.info(
                "bus publisher: stream %s takes entries again (it was blocked by %s)", stream, top
            )
