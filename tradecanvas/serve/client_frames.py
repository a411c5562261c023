"""The control frames a WebSocket client sends, found in its byte stream beside the library
that parses it (trio-websocket on the WS port, Hypercorn on the HTTP port), and the limit
on its pings.

Both libraries answer every ping at once, and neither lets the daemon see them: a client
sending pings as fast as it can had one core answering them (about 75 µs a ping, some
80,000 in 8 s), past the message rate limit, which counts only messages (DESIGN §6).
:class:`ClientFrames` reads the frames' headers as the bytes arrive (RFC 6455 §5.2; every
other frame is skipped, however long) and reports each ping and each pong's payload;
:func:`ping_limit` says when a client has pinged more than :data:`PINGS_PER_S` a second
(bursts of :data:`PINGS_BURST`). A client library pings every few seconds and a browser
never does, so the guard closes such a connection at once (1008, :func:`close_frame`).
Sans-IO: the transports feed the bytes and pass the time in.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Final, final

import trio

from tradecanvas.serve.ws_protocol import TokenBucket

# WebSocket opcodes (RFC 6455 §5.2)
OP_CLOSE: Final = 0x8
OP_PING: Final = 0x9
OP_PONG: Final = 0xA
# pings a client may send: a second's worth, and saved up
PINGS_PER_S: Final = 10
PINGS_BURST: Final = 50
PING_FLOOD: Final = f"more than {PINGS_PER_S} pings a second"
CLOSE_POLICY: Final = 1008
# how long a flooding client is given to take its close frame before the connection ends
FLOOD_CLOSE_S: Final = 1.0


class PingFlood(Exception):
    """A client pinged over the limit: raised out of :meth:`ClientFrames.feed` by the
    ``on_ping`` of :func:`ping_limit`; the transport closes the connection (1008)."""


@final
class ClientFrames:
    """Feed it what a client sends once its WebSocket is open: it calls ``on_ping`` for
    each ping frame (as soon as its header is in) and ``on_pong`` with each pong's payload
    (unmasked). ``on_ping`` may raise: the exception goes to the caller of :meth:`feed`."""

    __slots__ = ("_buffer", "_skip", "on_ping", "on_pong")

    def __init__(
        self,
        *,
        on_pong: Callable[[bytes], None] | None = None,
        on_ping: Callable[[], None] | None = None,
    ) -> None:
        self._buffer = bytearray()
        self._skip = 0  # payload bytes of a skipped frame still to come
        self.on_pong = on_pong
        self.on_ping = on_ping

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
        buffer = self._buffer
        buffer += view
        while len(buffer) >= 2:
            opcode, length, head = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length >= 126:
                size = 2 if length == 126 else 8
                if len(buffer) < head + size:
                    return
                length = int.from_bytes(buffer[head : head + size], "big")
                head += size
            masked = bool(buffer[1] & 0x80)
            head += 4 if masked else 0
            if len(buffer) < head:
                return
            if opcode != OP_PONG or self.on_pong is None:  # skipped, however long
                taken = min(length, len(buffer) - head)
                self._skip = length - taken
                del buffer[: head + taken]
                if opcode == OP_PING and self.on_ping is not None:
                    self.on_ping()
                continue
            if len(buffer) < head + length:
                return
            payload = bytes(buffer[head : head + length])
            if masked:
                key = buffer[head - 4 : head]
                payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
            del buffer[: head + length]
            self.on_pong(payload)


def ping_limit(clock: Callable[[], float]) -> Callable[[], None]:
    """An ``on_ping`` for :class:`ClientFrames` that raises :class:`PingFlood` once the
    client is over :data:`PINGS_PER_S` (bursts of :data:`PINGS_BURST`), counted from now."""
    bucket = TokenBucket(PINGS_PER_S, PINGS_BURST, clock())

    def on_ping() -> None:
        if not bucket.take(clock()):
            raise PingFlood(PING_FLOOD)

    return on_ping


def peer_of(sock: socket.socket | trio.socket.SocketType) -> str:
    """``host:port`` of a connection's peer, for log lines (``?`` once it is gone)."""
    try:
        host, port, *_ = sock.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"


def close_frame(code: int, reason: str) -> bytes:
    """A server's close frame (unmasked, RFC 6455 §5.5.1) with ``code`` and ``reason``
    (at most 123 bytes of UTF-8)."""
    payload = code.to_bytes(2, "big") + reason.encode()[:123]
    return bytes([0x80 | OP_CLOSE, len(payload)]) + payload


__all__ = [
    "CLOSE_POLICY",
    "FLOOD_CLOSE_S",
    "OP_PING",
    "OP_PONG",
    "PINGS_BURST",
    "PINGS_PER_S",
    "PING_FLOOD",
    "ClientFrames",
    "PingFlood",
    "close_frame",
    "peer_of",
    "ping_limit",
]
