"""An edge's reading of Redis's replies, as Redis sent them (pure, no I/O): XREAD replies,
stream entries and their fields, and the batch notices (``bus/ids.py``). Anything else is
a :class:`~tradecanvas.errors.WireError`.

The feed takes replies without coredis's conversion: coredis's ``xread()`` checks its
arguments and turns every entry into a ``StreamEntry`` with a dict of its fields, which cost
more than the rest of the read.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from tradecanvas.bus.ids import (
    NOTICE_ENTRIES_FIELD,
    NOTICE_KEYS_FIELD,
    NOTICE_NUMBER_FIELD,
    StreamId,
    candle_time_of,
    event_id_of,
)
from tradecanvas.errors import WireError
from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.wire.bus import CANDLE_FIELD, EVENT_FIELD, decode_candle, decode_event

# where the batch notices stand (KEYS: the notices stream, its counter): the last entry's
# ID and the counter, read together (bus/publisher.py writes both in one script)
NOTICES_TOP: Final = """
local top = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local count = redis.call('GET', KEYS[2])
return {top[1] and top[1][1] or '0-0', count or '0'}
"""
# an XREAD entry as Redis sends it: [id, [field, value, field, value, ...]]
RawEntry = Sequence[object]


def xread_entries(raw: object) -> dict[bytes, Sequence[RawEntry]]:
    """An XREAD reply (RESP3: a map of stream → entries; RESP2: a list of [stream, entries];
    nothing new: None) as stream key → entries. WireError for anything else."""
    if raw is None:
        return {}
    pairs = list(raw.items()) if isinstance(raw, dict) else raw
    if not isinstance(pairs, list):
        raise WireError("bus", f"unexpected XREAD reply {raw!r:.200}")
    out: dict[bytes, Sequence[RawEntry]] = {}
    for pair in pairs:
        key, entries = pair if isinstance(pair, list | tuple) and len(pair) == 2 else (None, None)
        if not isinstance(key, bytes) or not isinstance(entries, list):
            raise WireError("bus", f"unexpected XREAD reply {raw!r:.200}")
        out[key] = entries
    return out


def entry_id_of(entry: RawEntry) -> StreamId:
    identifier = entry[0] if entry else None
    if not isinstance(identifier, bytes | str):
        raise WireError("bus", f"malformed stream entry {entry!r:.200}")
    return StreamId.parse(identifier)


def entry_field(entry: RawEntry, name: bytes) -> bytes | str:
    """Field ``name`` of an XREAD entry; WireError when the entry is not one or lacks it."""
    value = _field(entry, name)
    if value is None:
        raise WireError("bus", f"stream entry without field {name!r}")
    return value


def candle_of(entry: RawEntry, entry_id: StreamId) -> Candle:
    """The candle a series stream's entry holds; WireError when it is none, or another
    bar than its ID says."""
    candle = decode_candle(entry_field(entry, CANDLE_FIELD))
    if candle.candle_time != candle_time_of(entry_id):
        raise WireError("bus", f"entry {entry_id} holds {candle.candle_time}")
    return candle


def event_of(entry: RawEntry, entry_id: StreamId) -> tuple[int, SystemEvent]:
    """The event (and its id) an events stream's entry holds; WireError when it is none,
    or another event than its ID says."""
    fields = decode_event(entry_field(entry, EVENT_FIELD))
    if fields.event_id != event_id_of(entry_id):
        raise WireError("bus", f"entry {entry_id} holds event {fields.event_id}")
    event = SystemEvent(
        fields.series_id,
        fields.reason,
        fields.from_time,
        fields.to_time,
        fields.event,
        fields.event_id,
    )
    return fields.event_id, event


def _field(entry: RawEntry, name: bytes) -> bytes | str | None:
    """Field ``name`` of an XREAD entry (None: it has none); WireError when the entry is not
    one or the field is not a string."""
    if len(entry) != 2 or not isinstance(entry[1], list):
        raise WireError("bus", f"malformed stream entry {entry!r:.200}")
    values = entry[1]
    for i in range(0, len(values) - 1, 2):
        if values[i] == name:
            value = values[i + 1]
            if isinstance(value, bytes | str):
                return value
            raise WireError("bus", f"stream entry field {name!r} is {value!r:.80}")
    return None


def notices_top(raw: object) -> tuple[StreamId, int]:
    """:data:`NOTICES_TOP`'s answer: the notices stream's last entry ID (0-0: none) and the
    number of the last notice (0: none); WireError for anything else."""
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(v, bytes) and v[:1].isdigit() for v in raw)
        or not raw[1].isdigit()
    ):
        raise WireError("bus", f"unexpected answer {raw!r:.200} about the batch notices")
    return StreamId.parse(raw[0]), int(raw[1])


# what a batch notice carries of each entry it names: (stream key, entry ID, payload)
Carried = tuple[bytes, bytes, bytes]


def notice_of(entry: RawEntry) -> tuple[int, list[bytes], list[Carried] | None]:
    """A batch notice's number, the stream keys it names and the entries it carries, in the
    batch's order (None: a notice of an older writer, which carries none); WireError if it
    is none."""
    number = entry_field(entry, NOTICE_NUMBER_FIELD)
    if not number.isdigit():
        raise WireError("bus", f"batch notice number {number!r}")
    named = entry_field(entry, NOTICE_KEYS_FIELD)
    text = named if isinstance(named, bytes) else named.encode()
    carried = _field(entry, NOTICE_ENTRIES_FIELD)
    if carried is None:
        return int(number), text.split(b"\n"), None
    return (
        int(number),
        text.split(b"\n"),
        carried_entries(carried if isinstance(carried, bytes) else carried.encode()),
    )


def carried_entries(text: bytes) -> list[Carried]:
    """A notice's ``entries`` field (``bus/ids.py``): per entry its stream key, ID and
    payload; WireError when the text is not made of such entries."""
    out: list[Carried] = []
    at, end = 0, len(text)
    while at < end:
        key_end = text.find(b"\n", at)
        id_end = text.find(b"\n", key_end + 1) if key_end >= 0 else -1
        length_end = text.find(b"\n", id_end + 1) if id_end >= 0 else -1
        length = text[id_end + 1 : length_end]
        if length_end < 0 or not length.isdigit():
            raise WireError("bus", f"malformed batch notice entries at byte {at}")
        payload_end = length_end + 1 + int(length)
        if payload_end > end or (payload_end < end and text[payload_end] != 0x0A):
            raise WireError("bus", f"malformed batch notice entries at byte {at}")
        key, entry_id = text[at:key_end], text[key_end + 1 : id_end]
        out.append((key, entry_id, text[length_end + 1 : payload_end]))
        at = payload_end + 1
    return out
