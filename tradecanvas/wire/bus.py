"""The bus's payloads (Redis Streams entries and pub/sub messages) ↔ model. Plain data, no I/O.

A closed or forming candle travels as one compact JSON array of its exact decimal texts,
``[t, "o", "h", "l", "c", "v", "qv"|null, trades|null, "tbb"|null, "tbq"|null]`` (``t`` in
unix seconds), so an edge rebuilds exactly the :class:`Candle` the ingest committed; a system
event as a JSON object of its fields, its ``event_id`` included. Every decoder raises
:class:`~tradecanvas.errors.WireError` (reason ``bus``) for anything malformed, and for a
candle whose values no real bar has (not finite, negative, open or close outside
[low, high], not on a minute: ``model.candle_problems``): the ingest commits none such.
A payload over :data:`MAX_PAYLOAD_BYTES` is refused before it is parsed: the bus's own are
a few hundred bytes, and a huge one (a Redis others can write to) would cost its parse on
every edge.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any, Final, Protocol

import attrs
import orjson

from tradecanvas.errors import WireError
from tradecanvas.model import Candle, Timeframe, candle_problems, plainly_valid

# the one field of a stream entry: ``c`` a closed candle, ``e`` a system event
CANDLE_FIELD: Final = b"c"
EVENT_FIELD: Final = b"e"
_REASON: Final = "bus"
ONE_MINUTE: Final = Timeframe.parse("1m")
# the most a payload may hold: a candle's is about 150 bytes, an event's a few hundred
MAX_PAYLOAD_BYTES: Final = 64 * 1024


class EventLike(Protocol):
    """What is sent of a system event (``pipeline.events.SystemEvent`` has it)."""

    @property
    def series_id(self) -> str: ...
    @property
    def reason(self) -> str: ...
    @property
    def from_time(self) -> int | None: ...
    @property
    def to_time(self) -> int | None: ...
    @property
    def event(self) -> str: ...
    @property
    def event_id(self) -> int | None: ...


@attrs.frozen
class EventFields:
    """A system event as read from the bus (the bus turns it back into a SystemEvent)."""

    series_id: str
    reason: str
    from_time: int | None
    to_time: int | None
    event: str
    event_id: int


def _dec(value: Decimal | None) -> str | None:
    return None if value is None else str(value)


def candle_to_list(candle: Candle) -> list[object]:
    return [
        candle.candle_time,
        str(candle.open),
        str(candle.high),
        str(candle.low),
        str(candle.close),
        str(candle.volume),
        _dec(candle.quote_volume),
        candle.trades,
        _dec(candle.taker_buy_base),
        _dec(candle.taker_buy_quote),
    ]


def encode_candle(candle: Candle) -> bytes:
    return orjson.dumps(candle_to_list(candle))


def _decimal(raw: object, name: str) -> Decimal:
    if not isinstance(raw, str):
        raise WireError(_REASON, f"{name} must be a decimal string, got {raw!r}")
    try:
        return Decimal(raw)
    except InvalidOperation:
        raise WireError(_REASON, f"{name} is not a decimal: {raw!r}") from None


def _optional_decimal(raw: object, name: str) -> Decimal | None:
    return None if raw is None else _decimal(raw, name)


def candle_from_list(raw: object) -> Candle:
    if not isinstance(raw, list) or len(raw) != 10:
        raise WireError(_REASON, f"a candle is a list of 10 items, got {raw!r:.120}")
    t, o, h, low, c, v, qv, n, tbb, tbq = raw
    if isinstance(t, bool) or not isinstance(t, int):
        raise WireError(_REASON, f"candle_time must be an integer, got {t!r}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int)):
        raise WireError(_REASON, f"trades must be an integer or null, got {n!r}")
    candle = Candle(
        t,
        _decimal(o, "open"),
        _decimal(h, "high"),
        _decimal(low, "low"),
        _decimal(c, "close"),
        _decimal(v, "volume"),
        _optional_decimal(qv, "quote_volume"),
        n,
        _optional_decimal(tbb, "taker_buy_base"),
        _optional_decimal(tbq, "taker_buy_quote"),
    )
    if t < 0 or t % 60 or not plainly_valid(candle):
        # the ingest commits no such candle, so it did not send it: a Redis others can
        # write to, or a bug; it must not reach a subscriber (every bar opens on a minute)
        problems = candle_problems(candle, ONE_MINUTE)
        raise WireError(_REASON, problems[0][1] if problems else f"not a candle: {raw!r:.120}")
    return candle


def _json(raw: bytes | str) -> Any:
    if len(raw) > MAX_PAYLOAD_BYTES:  # (a str: characters; the bus reads bytes)
        raise WireError(
            _REASON, f"payload of {len(raw)} bytes is over the cap of {MAX_PAYLOAD_BYTES}"
        )
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError(_REASON, f"not JSON: {exc}") from None


def decode_candle(raw: bytes | str) -> Candle:
    return candle_from_list(_json(raw))


def encode_event(event: EventLike) -> bytes:
    return orjson.dumps(
        {
            "event_id": event.event_id,
            "series_id": event.series_id,
            "event": event.event,
            "reason": event.reason,
            "from_time": event.from_time,
            "to_time": event.to_time,
        }
    )


def decode_event(raw: bytes | str) -> EventFields:
    data = _json(raw)
    if not isinstance(data, dict):
        raise WireError(_REASON, f"an event is a JSON object, got {data!r:.120}")
    event_id, series_id = data.get("event_id"), data.get("series_id")
    event, reason = data.get("event"), data.get("reason")
    from_time, to_time = data.get("from_time"), data.get("to_time")
    if isinstance(event_id, bool) or not isinstance(event_id, int) or event_id < 1:
        raise WireError(_REASON, f"event_id must be a positive integer, got {event_id!r}")
    if not isinstance(series_id, str) or not isinstance(event, str) or not isinstance(reason, str):
        raise WireError(_REASON, f"series_id, event and reason must be strings in {data!r:.160}")
    for name, value in (("from_time", from_time), ("to_time", to_time)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise WireError(_REASON, f"{name} must be an integer or null, got {value!r}")
    return EventFields(series_id, reason, from_time, to_time, event, event_id)


def encode_forming(series_id: str, candle: Candle) -> bytes:
    return orjson.dumps([series_id, candle_to_list(candle)])


def decode_forming(raw: bytes | str) -> tuple[str, Candle]:
    data = _json(raw)
    if not isinstance(data, list) or len(data) != 2 or not isinstance(data[0], str):
        raise WireError(_REASON, f"a forming message is [series_id, candle], got {data!r:.120}")
    return data[0], candle_from_list(data[1])
