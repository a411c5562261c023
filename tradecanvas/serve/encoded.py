"""Outgoing messages encoded once and framed once, shared by every subscriber that gets them
(DESIGN §3). Plain data and functions, no I/O.

A closed candle published to a series goes to each of its subscribers in the same
``candle_closed`` (or ``candles_batch``) text; the Hub (``tradecanvas.serve.hub``) keeps, per
series, the encodings of what it last published in a :class:`SharedEncodings`, and every
subscriber that sends those same candles — at once from the publish, or later from its queue
— reuses the JSON and the WebSocket frame instead of encoding its own. Candles are matched by
identity: candles read from the store are different objects and are encoded afresh.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, final

import orjson

from tradecanvas.model import Candle
from tradecanvas.serve.outgoing import (
    ClosedCandles,
    FormingCandle,
    Outgoing,
    WholeMessage,
    encode,
)

# WebSocket (RFC 6455) text frame, FIN set, sent by the server (unmasked)
_TEXT_FIN: Final = 0x81
# series whose last publish is remembered: more than any daemon serves; only a bound
MAX_SERIES_REMEMBERED: Final = 100_000


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented WebSocket text frame carrying ``payload`` (UTF-8)."""
    n = len(payload)
    if n < 126:
        head = bytes((_TEXT_FIN, n))
    elif n < 1 << 16:
        head = bytes((_TEXT_FIN, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((_TEXT_FIN, 127)) + n.to_bytes(8, "big")
    return head + payload


@final
class Encoded:
    """One message's wire text (UTF-8 JSON) and its WebSocket frame, each made once, on
    first use, and shared by every subscriber that sends it."""

    __slots__ = ("_frame", "_text", "payload")

    def __init__(self, payload: bytes, text: str | None = None) -> None:
        self.payload = payload
        self._text = text
        self._frame: bytes | None = None

    @classmethod
    def of_text(cls, text: str) -> Encoded:
        return cls(text.encode(), text)

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = self.payload.decode()
        return self._text

    @property
    def frame(self) -> bytes:
        if self._frame is None:
            self._frame = text_frame(self.payload)
        return self._frame


def closed_message(series_id: str, candle: Candle) -> Encoded:
    return Encoded(
        orjson.dumps({"type": "candle_closed", "series_id": series_id, "candle": candle.to_wire()})
    )


def batch_message(series_id: str, candles: Sequence[Candle]) -> Encoded:
    return Encoded(
        orjson.dumps(
            {
                "type": "candles_batch",
                "series_id": series_id,
                "candles": [c.to_wire() for c in candles],
            }
        )
    )


def forming_message(series_id: str, candle: Candle) -> Encoded:
    return Encoded(
        orjson.dumps({"type": "candle_forming", "series_id": series_id, "candle": candle.to_wire()})
    )


@final
class Published:
    """One publish of closed candles to a series: their messages, made on first use."""

    __slots__ = ("_batch", "_closed", "candles", "series_id")

    def __init__(self, series_id: str, candles: tuple[Candle, ...]) -> None:
        self.series_id = series_id
        self.candles = candles
        self._closed: list[Encoded] | None = None
        self._batch: Encoded | None = None

    def closed(self) -> list[Encoded]:
        """One ``candle_closed`` per candle, in order."""
        if self._closed is None:
            self._closed = [closed_message(self.series_id, c) for c in self.candles]
        return self._closed

    def batch(self) -> Encoded:
        """All the candles in one ``candles_batch`` (the caller keeps to the split size)."""
        if self._batch is None:
            self._batch = batch_message(self.series_id, self.candles)
        return self._batch

    def frames(self, batch: bool, catchup_limit: int) -> bytes | None:
        """The frames a subscription gets for these candles (None when a batch would be
        split: the caller encodes it the long way)."""
        if not batch:
            closed = self.closed()
            return closed[0].frame if len(closed) == 1 else b"".join(e.frame for e in closed)
        if len(self.candles) > catchup_limit:
            return None
        return self.batch().frame


def _same(a: Sequence[Candle], b: Sequence[Candle]) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


@final
class SharedEncodings:
    """Per series, the last closed publish and the last forming candle, encoded once.

    :meth:`encode` turns a drain plan's message into :class:`Encoded` ones, reusing these
    when the message carries the very candles that were published."""

    __slots__ = ("_closed", "_forming", "catchup_limit")

    def __init__(self, catchup_limit: int) -> None:
        self.catchup_limit = catchup_limit
        self._closed: dict[str, Published] = {}
        self._forming: dict[str, tuple[Candle, Encoded]] = {}

    def published(self, series_id: str, candles: Sequence[Candle]) -> Published:
        """Remember (and return) a publish of ``candles`` to ``series_id``."""
        if len(self._closed) >= MAX_SERIES_REMEMBERED and series_id not in self._closed:
            self._closed.clear()
        published = Published(series_id, tuple(candles))
        self._closed[series_id] = published
        return published

    def forming(self, series_id: str, candle: Candle) -> Encoded:
        """The ``candle_forming`` message of ``candle`` (encoded once per candle object)."""
        known = self._forming.get(series_id)
        if known is not None and known[0] is candle:
            return known[1]
        if len(self._forming) >= MAX_SERIES_REMEMBERED and series_id not in self._forming:
            self._forming.clear()
        encoded = forming_message(series_id, candle)
        self._forming[series_id] = (candle, encoded)
        return encoded

    def encode(self, message: Outgoing) -> list[Encoded]:
        """The encoded wire messages of ``message``, in order (as ``outgoing.encode``)."""
        if isinstance(message, WholeMessage):
            return [Encoded.of_text(message.text)]
        if isinstance(message, FormingCandle):
            return [self.forming(message.series_id, message.candle)]
        if isinstance(message, ClosedCandles):
            published = self._closed.get(message.series_id)
            if published is not None:
                if _same(message.candles, published.candles):
                    if not message.batch:
                        return list(published.closed())
                    if len(message.candles) <= self.catchup_limit:
                        return [published.batch()]
                elif not message.batch:
                    return self._closed_each(message, published)
        return [Encoded.of_text(text) for text in encode(message, self.catchup_limit)]

    @staticmethod
    def _closed_each(message: ClosedCandles, published: Published) -> list[Encoded]:
        """Single ``candle_closed`` messages, reusing those of the published candles."""
        known = {id(c): e for c, e in zip(published.candles, published.closed(), strict=True)}
        return [known.get(id(c)) or closed_message(message.series_id, c) for c in message.candles]


__all__ = [
    "Encoded",
    "Published",
    "SharedEncodings",
    "batch_message",
    "closed_message",
    "forming_message",
    "text_frame",
]
