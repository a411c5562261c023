"""Hypercorn's server of one TCP connection, speaking HTTP/1.1 only (the HTTP port's).

Hypercorn switches a cleartext connection to HTTP/2 when the client asks: an ``Upgrade: h2c``
request gets a 101 (even without ``HTTP2-Settings``), and a connection that starts with the
HTTP/2 preface (prior knowledge) is served as HTTP/2. Neither is wanted here: the daemon sits
behind a proxy that speaks HTTP/1.1 to it (or serves a browser directly, which never speaks
cleartext HTTP/2), and the protections of /ws/market on this port — the read of the client's
frames, the ping limit, the send-buffer cap, the read proof, one session per connection — are
built on a TCP connection carrying one HTTP/1.1 WebSocket. Over HTTP/2 (RFC 8441) none held:
a client had 650,000 pings answered in 10 s, and one connection carried 100 sessions. And a
proxy that forwards any ``Upgrade`` made ``h2c`` a tunnel past its own rules ("h2c
smuggling": ``GET /metrics`` over the upgraded connection).

:class:`Http11Server` is Hypercorn's ``TCPServer`` with :class:`Http11Protocol` in place of the
HTTP/1.1 protocol it would switch from:

- ``Upgrade: h2c`` is not taken up: the request is answered over HTTP/1.1, as RFC 9110 §7.8
  lets a server do;
- the HTTP/2 preface gets an HTTP/2 ``GOAWAY`` with ``HTTP_1_1_REQUIRED`` (RFC 9113 §7), so an
  HTTP/2 client reports why, and the connection ends;
- a request with both ``Content-Length`` and ``Transfer-Encoding`` (a request-smuggling shape,
  RFC 9112 §6.3) gets 400 with ``Connection: close``, and the connection ends: h11 would read
  it as chunked and keep the connection open for what follows.
"""

from __future__ import annotations

from typing import Final, final

import h11
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer

# RFC 9113: the server's preface (an empty SETTINGS frame), then GOAWAY with no stream
# processed (last stream 0) and HTTP_1_1_REQUIRED (0xd)
_SETTINGS: Final = bytes([0, 0, 0, 0x4, 0]) + bytes(4)
_GOAWAY_DEBUG: Final = b"HTTP/1.1 only"
_GOAWAY: Final = (
    (8 + len(_GOAWAY_DEBUG)).to_bytes(3, "big")
    + bytes([0x7, 0])
    + bytes(4)
    + bytes(4)
    + (0xD).to_bytes(4, "big")
    + _GOAWAY_DEBUG
)
HTTP2_REFUSAL: Final = _SETTINGS + _GOAWAY


class _Refused(Exception):
    """The request was answered with a refusal: the connection ends."""


@final
class Http11Protocol(H11Protocol):
    """Hypercorn's HTTP/1.1 protocol that never hands the connection to HTTP/2 and refuses
    an ambiguous body length (see the module docstring)."""

    async def handle(self, event: Event) -> None:
        try:
            await super().handle(event)
        except _Refused:
            await self.send(Closed())

    async def _check_protocol(self, event: h11.Request) -> None:
        # called by H11Protocol for each request before it is served; Hypercorn's own
        # switches to HTTP/2 here. An Upgrade: h2c is left alone: answered over HTTP/1.1
        if event.method == b"PRI" and event.target == b"*" and event.http_version == b"2.0":
            await self.send(RawData(data=HTTP2_REFUSAL))
            raise _Refused
        names = {name for name, _ in event.headers}  # h11 gives them lower-cased
        if b"content-length" in names and b"transfer-encoding" in names:
            await self._send_error_response(400)  # with Connection: close
            raise _Refused


@final
class Http11Server(TCPServer):
    """Hypercorn's ``TCPServer`` for one plain TCP connection, with :class:`Http11Protocol`:
    the protocol wrapper it builds is given ours in place of its own HTTP/1.1 protocol, which
    is the one it starts with on a connection without TLS (it switches away from it only on
    the HTTP/2 errors that ours never raises)."""

    @property
    def protocol(self) -> ProtocolWrapper:
        return self._wrapper

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        wrapper.protocol = Http11Protocol(
            wrapper.app,
            wrapper.config,
            wrapper.context,
            wrapper.task_group,
            wrapper.state,
            wrapper.ssl,
            wrapper.client,
            wrapper.server,
            wrapper.send,
        )
        self._wrapper = wrapper


__all__ = ["HTTP2_REFUSAL", "Http11Protocol", "Http11Server"]
