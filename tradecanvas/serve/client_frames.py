"""What a WebSocket client sends, read a second time beside the library that serves it
(trio-websocket on the WS port, Hypercorn on the HTTP port): its control frames, the limit
on its pings, and the frames that break the protocol.

Both libraries answer every ping at once, and neither lets the daemon see them: a client
sending pings as fast as it can had one core answering them (about 75 µs a ping, some
80,000 in 8 s), past the message rate limit, which counts only messages (DESIGN §6).
:class:`ClientFrames` parses the client's bytes as they arrive with wsproto's own frame
decoder (the one both libraries use, so its verdicts are theirs) and reports each ping and
each pong's payload; :func:`ping_limit` says when a client has pinged more than
:data:`PINGS_PER_S` a second (bursts of :data:`PINGS_BURST`). A client library pings every
few seconds and a browser never does, so the guard closes such a connection at once (1008,
:func:`close_frame`).

A frame that breaks RFC 6455 (a reserved bit or opcode, an unmasked frame, a fragmented or
oversized control frame, a continuation out of place, text that is not UTF-8, a malformed
close) raises :class:`ProtocolViolation` with the code wsproto gives it, 1002 or 1007. The
libraries would only drop the TCP connection (wsproto reports such a frame as a close the
client never sent); the transports send the close frame the RFC asks for (§7.1.7) first, so
a client developer sees why. Sans-IO: the transports feed the bytes and pass the time in.

A message over :data:`MAX_READ_MESSAGE_BYTES` raises :class:`MessageTooBig` (1009) as soon as
that many bytes of it are read — inflated bytes, for a compressed one (permessage-deflate,
which the HTTP port agrees to with browsers): a message is inflated a step at a time, never
beyond the limit (:class:`BoundedInflate`). The transports raise it before the library is
handed the bytes that pass the limit, and end the connection, so the library never holds or
inflates more either: Hypercorn read and inflated everything after its own 1009 (4 MB on the
wire inflated to 4 GiB in its buffer and, for the check, in this module).
"""

from __future__ import annotations

import logging
import socket
import zlib
from collections.abc import Callable, Iterable, Sequence
from typing import Final, final

import trio
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import (
    CloseReason,
    FrameDecoder,
    FrameProtocol,
    Opcode,
    ParseFailed,
    RsvBits,
)
from wsproto.handshake import server_extensions_handshake
from wsproto.utilities import split_comma_header

from tradecanvas.serve.ws_protocol import CLOSE_TOO_BIG, MAX_MESSAGE_BYTES, TokenBucket

log = logging.getLogger(__name__)

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
# The most bytes of one message read: the sessions' limit is MAX_MESSAGE_BYTES characters
# (trio-websocket counts characters of text, and so does the session on the HTTP port), and a
# character takes up to 4 bytes of UTF-8; a message past this is past that limit too
MAX_READ_MESSAGE_BYTES: Final = 4 * MAX_MESSAGE_BYTES
TOO_BIG: Final = "message too big"
# the opcodes of a message's first frame (its continuations carry CONTINUATION)
_MESSAGE_STARTS: Final = (Opcode.TEXT, Opcode.BINARY)
# what permessage-deflate's sender leaves off the end of each message (RFC 7692 §7.2.2)
_DEFLATE_TAIL: Final = b"\x00\x00\xff\xff"


class ClientFault(Exception):
    """What a client sent ends its connection: the transport writes a close frame with
    ``code`` and the exception's text, then ends the connection."""

    code: int = CLOSE_POLICY


class PingFlood(ClientFault):
    """A client pinged over the limit: raised out of :meth:`ClientFrames.feed` by the
    ``on_ping`` of :func:`ping_limit`; the transport closes the connection (1008)."""


class MessageTooBig(ClientFault):
    """A message over :data:`MAX_READ_MESSAGE_BYTES` (inflated, if compressed): 1009."""

    code = CLOSE_TOO_BIG


class ProtocolViolation(ClientFault):
    """A frame that breaks RFC 6455, with wsproto's close code for it (1002, or 1007 for
    text that is not UTF-8)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@final
class BoundedInflate(Extension):
    """The reading half of permessage-deflate (RFC 7692) as a connection's handshake agreed
    to it (``agreed``), inflating at most ``max_bytes + 1`` bytes of one message: a frame
    that would inflate further ends the read with 1009 (``CloseReason.MESSAGE_TOO_BIG``),
    its rest left compressed. wsproto's own :class:`PerMessageDeflate` inflates a frame
    whole, whatever it inflates to. Only for reading: it writes nothing."""

    name = PerMessageDeflate.name

    def __init__(self, agreed: PerMessageDeflate, max_bytes: int) -> None:
        self._window_bits = agreed.client_max_window_bits
        self._no_context_takeover = agreed.client_no_context_takeover
        self._max_bytes = max_bytes
        self._inflater: zlib._Decompress | None = None
        self._message_compressed = False  # the message being read (RSV1 of its first frame)
        self._frame_compressed = False  # the frame being read: a data frame of that message
        self._inflated = 0  # bytes of that message so far

    def enabled(self) -> bool:
        return True

    def offer(self) -> bool:
        return False  # agreed already: nothing to offer

    def frame_inbound_header(
        self,
        proto: FrameDecoder | FrameProtocol,
        opcode: Opcode,
        rsv: RsvBits,
        payload_length: int,
    ) -> CloseReason | RsvBits:
        if rsv.rsv1 and (opcode.iscontrol() or opcode is Opcode.CONTINUATION):
            return CloseReason.PROTOCOL_ERROR  # only a message's first frame says it
        if opcode in _MESSAGE_STARTS:
            self._message_compressed = rsv.rsv1
            self._inflated = 0
        self._frame_compressed = self._message_compressed and not opcode.iscontrol()
        return RsvBits(True, False, False)

    def frame_inbound_payload_data(
        self, proto: FrameDecoder | FrameProtocol, data: bytes
    ) -> bytes | CloseReason:
        return self._inflate(data) if self._frame_compressed else data

    def frame_inbound_complete(
        self, proto: FrameDecoder | FrameProtocol, fin: bool
    ) -> bytes | CloseReason | None:
        if not (fin and self._frame_compressed):
            return None
        rest = self._inflate(_DEFLATE_TAIL)
        if self._no_context_takeover:
            self._inflater = None
        self._message_compressed = self._frame_compressed = False
        return rest

    def _inflate(self, data: bytes) -> bytes | CloseReason:
        if self._inflater is None:
            self._inflater = zlib.decompressobj(-self._window_bits)
        # at least 1 (a max_length of 0 is no limit): past the limit ends the read
        room = self._max_bytes + 1 - self._inflated
        try:
            inflated = self._inflater.decompress(data, room)
        except zlib.error:
            return CloseReason.INVALID_FRAME_PAYLOAD_DATA
        self._inflated += len(inflated)
        if self._inflated > self._max_bytes:
            return CloseReason.MESSAGE_TOO_BIG
        return inflated


@final
class ClientFrames:
    """Feed it what a client sends once its WebSocket is open: it calls ``on_ping`` for
    each ping frame and ``on_pong`` with each pong's payload, raises :class:`MessageTooBig`
    once a message passes ``max_message_bytes`` (inflated) and :class:`ProtocolViolation`
    at the first frame that breaks the protocol. ``on_ping`` may raise: the exception goes
    to the caller of :meth:`feed`. After the client's close frame, or an error, the rest is
    not read (the library ends the connection). Holds no message: each frame's payload is
    dropped once read, so what it keeps is bounded whatever the client sends."""

    __slots__ = ("_done", "_frames", "_max_message_bytes", "_message_bytes", "on_ping", "on_pong")

    def __init__(
        self,
        *,
        on_pong: Callable[[bytes], None] | None = None,
        on_ping: Callable[[], None] | None = None,
        extensions: Sequence[Extension] = (),
        max_message_bytes: int = MAX_READ_MESSAGE_BYTES,
    ) -> None:
        # the extensions the connection's handshake agreed to (their RSV bits are legal)
        agreed = [_bounded(x, max_message_bytes) for x in extensions if x.enabled()]
        self._frames = FrameProtocol(client=False, extensions=agreed)
        self._done = False
        self._max_message_bytes = max_message_bytes
        self._message_bytes = 0  # of the message being read (inflated)
        self.on_pong = on_pong
        self.on_ping = on_ping

    def feed(self, data: bytes) -> None:
        if self._done or not data:
            return
        self._frames.receive_bytes(data)
        try:
            for frame in self._frames.received_frames():
                if not frame.opcode.iscontrol():
                    # wsproto hands text over decoded: its bytes are its UTF-8 again
                    payload = frame.payload
                    self._message_bytes += len(
                        payload.encode() if isinstance(payload, str) else payload
                    )
                    if self._message_bytes > self._max_message_bytes:
                        raise MessageTooBig(TOO_BIG)
                    if frame.message_finished:
                        self._message_bytes = 0
                elif frame.opcode is Opcode.PING:
                    if self.on_ping is not None:
                        self.on_ping()
                elif frame.opcode is Opcode.PONG:
                    if self.on_pong is not None:
                        self.on_pong(bytes(frame.payload))  # type: ignore[arg-type]
                elif frame.opcode is Opcode.CLOSE:
                    self._done = True
        except ParseFailed as exc:
            self._done = True
            if exc.code is CloseReason.MESSAGE_TOO_BIG:
                raise MessageTooBig(TOO_BIG) from None
            raise ProtocolViolation(int(exc.code), str(exc)) from None
        except ClientFault:
            self._done = True
            raise


def _bounded(extension: Extension, max_bytes: int) -> Extension:
    """``extension`` as :class:`ClientFrames` reads with it: permessage-deflate inflating
    within ``max_bytes``."""
    if isinstance(extension, PerMessageDeflate):
        return BoundedInflate(extension, max_bytes)
    return extension


def hypercorn_extensions(headers: Iterable[tuple[bytes, bytes]]) -> list[Extension]:
    """The extensions Hypercorn agrees to for a WebSocket request with these headers, made
    the way its handshake makes them (``hypercorn.protocol.ws_stream.Handshake``: it offers
    permessage-deflate and takes the last ``Sec-WebSocket-Extensions`` header), so that
    :class:`ClientFrames` reads the client's frames as Hypercorn does. Browsers offer
    permessage-deflate and then compress their messages (RSV1 set). trio-websocket, on the
    WS port, agrees to none."""
    extensions: list[Extension] = [PerMessageDeflate()]
    offers: list[str] | None = None
    for name, value in headers:
        if name.lower() == b"sec-websocket-extensions":
            offers = split_comma_header(value)
    if offers is not None:
        server_extensions_handshake(offers, extensions)
    return extensions


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


def log_client_fault(peer: str, fault: ClientFault) -> None:
    """The log line of a connection a :class:`ClientFault` closed: a warning for a flood or
    a message far over the limit (abuse), an info line for a broken frame (a client's bug)."""
    level = logging.WARNING if isinstance(fault, (PingFlood, MessageTooBig)) else logging.INFO
    log.log(level, "ws %s: closed %d: %s", peer, fault.code, fault)


def close_frame(code: int, reason: str) -> bytes:
    """A server's close frame (unmasked, RFC 6455 §5.5.1) with ``code`` and ``reason``
    (at most 123 bytes of UTF-8)."""
    text = reason.encode()[:123].decode(errors="ignore").encode()  # no character cut in two
    payload = code.to_bytes(2, "big") + text
    return bytes([0x80 | OP_CLOSE, len(payload)]) + payload


__all__ = [
    "CLOSE_POLICY",
    "FLOOD_CLOSE_S",
    "MAX_READ_MESSAGE_BYTES",
    "OP_PING",
    "OP_PONG",
    "PINGS_BURST",
    "PINGS_PER_S",
    "PING_FLOOD",
    "TOO_BIG",
    "BoundedInflate",
    "ClientFault",
    "ClientFrames",
    "MessageTooBig",
    "PingFlood",
    "ProtocolViolation",
    "close_frame",
    "hypercorn_extensions",
    "log_client_fault",
    "peer_of",
    "ping_limit",
]
