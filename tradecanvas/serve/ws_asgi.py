"""/ws/market on the HTTP port (DESIGN §10, one origin): a Starlette WebSocket under Hypercorn
as a transport of the session in :mod:`tradecanvas.serve.ws_session`, so a page served by
the daemon, or a frontend behind one address, needs no proxy.

:func:`market_websocket_routes` gives the routes for the HTTP app: every WebSocket request
goes to one endpoint, which answers the upgrade with :meth:`MarketEndpoint.admit` — 404
for another path, 403 for a disallowed ``Origin``, 503 while shutting down or at the
connection limit (the slot is taken before the 101 and given back however the connection
ends) — as an HTTP
response (the ASGI WebSocket denial-response extension, which Hypercorn supports), and runs
the session for the rest. Task tree of one accepted connection::

    _serve_websocket                      Hypercorn's task for this WebSocket
    └─ connection nursery
       ├─ AsgiTransport.write_frames      the only task that writes to Hypercorn
       └─ MarketEndpoint.serve            the session: publish task and reader loop

Where Hypercorn differs from trio-websocket, and what this module does about it:

- **Writes cannot be cancelled.** Hypercorn writes a frame to the socket in a shielded
  scope, so a send to a peer that stopped reading would ignore the Hub's send timeout. Every
  frame goes through one writer task instead; the session waits for the writer, and that
  wait is cancellable: the Hub's timeout works (4008), and a frame whose write has begun is
  finished first, never torn. If even the close frame cannot get out within the session's
  close deadline, the connection is aborted (:meth:`ServedConnection.abort`).
- **The peer's close code is not passed on.** Hypercorn 0.18 reports every close from the
  peer, clean or not, as 1006 (pgjones/hypercorn#127). It is taken as a close without a
  known code (1005): a goodbye, not a delivery failure — else every closed chart would fail
  the next strict publish. A connection lost without a close handshake is counted the same.
- **The kernel's buffers are not ours.** The accepted socket's send buffer is capped and
  every message waits for room in the connection's in-flight budget before it is handed to
  Hypercorn (``tradecanvas.serve.in_flight``), as on the WS port: a peer that stops reading
  is noticed by the session's stall watch and its close frame still fits.
- **No pings through ASGI.** The stall watch counts from pongs (what the client has read,
  whatever its buffers); Hypercorn neither sends an app's pings nor passes pongs on, so the
  connection writes them and picks the pongs out itself (``http_server.ServedConnection``).
- **The 64 KiB limit** is the session's own check (Hypercorn's limit is a looser backstop,
  ``http_server.WEBSOCKET_BACKSTOP_BYTES``), so that its 1009 is counted like the WS port's.
  A message far over it (past ``client_frames.MAX_READ_MESSAGE_BYTES``, inflated) is closed
  with 1009 by the connection before Hypercorn reads it (Hypercorn would read and inflate
  it all), and reported to the session as its own 1009.
- **HTTP/1.1 only.** A WebSocket over HTTP/2 (RFC 8441) would share its TCP connection with
  other streams, and none of the above could hold; ``serve_http`` never speaks HTTP/2.

Shutdown: the daemon calls :meth:`MarketEndpoint.shutdown` (every session gets 1001) before
the HTTP server drains; what is still open when the drain ends is aborted by the server.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Final, final

import trio
from starlette.responses import Response
from starlette.routing import BaseRoute, WebSocketRoute
from starlette.types import Message
from starlette.websockets import WebSocket

from tradecanvas.serve.http_server import ServedConnection, served_connection
from tradecanvas.serve.in_flight import InFlight, limit_send_buffer
from tradecanvas.serve.subscriber import TransportClosed
from tradecanvas.serve.ws_protocol import CLOSE_ABNORMAL, CLOSE_NO_STATUS, HandshakeRefusal
from tradecanvas.serve.ws_session import MarketEndpoint

log = logging.getLogger(__name__)

# every WebSocket path: the endpoint answers another path than /ws/market with 404 itself
ANY_WEBSOCKET_PATH: Final = "/{path:path}"


def market_websocket_routes(endpoint: MarketEndpoint) -> list[BaseRoute]:
    """The routes that serve ``endpoint`` in a Starlette app (put them after its HTTP
    routes: they take every WebSocket request, and only WebSocket requests)."""
    return [WebSocketRoute(ANY_WEBSOCKET_PATH, functools.partial(_serve_websocket, endpoint))]


def _peer(websocket: WebSocket) -> str:
    client = websocket.client
    return f"{client.host}:{client.port}" if client is not None else "?"


async def _serve_websocket(endpoint: MarketEndpoint, websocket: WebSocket) -> None:
    peer = _peer(websocket)
    admitted = endpoint.admit(str(websocket.scope["path"]), websocket.headers.get("origin"))
    if isinstance(admitted, HandshakeRefusal):
        log.info("ws %s (HTTP port): %s", peer, admitted.why)
        await websocket.send_denial_response(
            Response(admitted.body, status_code=admitted.status, media_type="text/plain")
        )
        return
    try:  # the slot is the session's once it runs; ours if the accept fails or is cancelled
        # the TCP connection is the WebSocket's alone: serve_http speaks HTTP/1.1 only
        served = served_connection(websocket.scope)
        if served is not None:
            served.became_session()  # under max_connections now, not the port's own cap
            # before the 101: the client's first frame may be a pong
            served.watch_pongs(websocket.scope["headers"])
        await websocket.accept()
        if served is not None:
            limit_send_buffer(served.socket)
        transport = AsgiTransport(websocket, served)
        async with trio.open_nursery() as connection:
            connection.start_soon(transport.write_frames)
            if served is not None and transport.in_flight is not None:
                connection.start_soon(_prove_reads, served, transport.in_flight)
            await endpoint.serve(transport, f"{peer} (HTTP port)", admitted)
            connection.cancel_scope.cancel()
    finally:
        admitted.release()


async def _prove_reads(served: ServedConnection, in_flight: InFlight) -> None:
    """The read proof of ``tradecanvas.serve.in_flight`` with the connection's own pings (the
    transport counts what it writes in characters, and no ping among them)."""
    with contextlib.suppress(trio.ClosedResourceError, trio.BrokenResourceError):
        await in_flight.prove_reads(served.ping, ping_bytes=0)


@final
class AsgiTransport:
    """An accepted Starlette WebSocket as a session transport (``SessionTransport``).

    Frames are written by :meth:`write_frames`, one at a time and in order; ``send_message``
    and ``aclose`` hand a frame over and wait until it is written (see the module docstring).
    After the peer has left, sends are dropped (Hypercorn drops them too) and the reader's
    ``TransportClosed`` ends the session. ``connection`` is what an unfinished close aborts
    (None under another server than ``serve_http``: the close is then only abandoned).
    """

    def __init__(self, websocket: WebSocket, connection: ServedConnection | None) -> None:
        self._websocket = websocket
        self._connection = connection
        self._in_flight = (
            InFlight(connection.socket, trio.current_time()) if connection is not None else None
        )
        # capacity 0: handing a frame over waits until the writer has finished the last one
        self._frames_in, self._frames_out = trio.open_memory_channel[Message](0)
        self._handed = 0
        self._written = 0
        self._progress = trio.Event()
        self._peer_left = False
        self._close_sent = False
        self._write_failed: str | None = None

    @property
    def frames(self) -> None:
        """No pre-framed writes: Hypercorn frames every message itself."""
        return None

    @property
    def in_flight(self) -> InFlight | None:
        """The connection's in-flight budget and stall clock (None under another server)."""
        return self._in_flight

    async def write_frames(self) -> None:
        """The writer task: runs until cancelled. A frame Starlette or Hypercorn refuses
        makes the connection broken (later sends raise ``TransportClosed(None)``)."""
        async with self._frames_out:
            async for frame in self._frames_out:
                if self._write_failed is None:
                    try:
                        await self._websocket.send(frame)
                    except Exception as exc:  # their errors (state, protocol): this one's end
                        self._write_failed = f"{type(exc).__name__}: {exc}"
                        log.info("ws %s: write failed: %s", _peer(self._websocket), exc)
                self._written += 1
                self._progress.set()
                self._progress = trio.Event()

    async def _write(self, frame: Message) -> None:
        await self._frames_in.send(frame)
        self._handed += 1
        ticket = self._handed
        while self._written < ticket:
            await self._progress.wait()

    async def send_message(self, message: str) -> None:
        if self._write_failed is None and not (self._peer_left or self._close_sent):
            if self._in_flight is not None:
                # characters for bytes: the frame header and non-ASCII are within the reserve
                await self._in_flight.wait_room(len(message))
            await self._write({"type": "websocket.send", "text": message})
            if self._in_flight is not None:
                self._in_flight.note_written(len(message))
        else:
            await trio.lowlevel.checkpoint()
        if self._write_failed is not None:
            raise TransportClosed(None, self._write_failed)

    async def get_message(self) -> str | bytes:
        if self._peer_left:
            raise TransportClosed(CLOSE_NO_STATUS)
        message = await self._websocket.receive()
        if message["type"] == "websocket.disconnect":
            self._peer_left = True
            fault = self._connection.fault if self._connection is not None else None
            if fault is not None:  # the connection's own close (a 1009 counts as the session's)
                raise TransportClosed(fault.code, str(fault))
            code = message.get("code")
            # Hypercorn's 1006 stands for any close by the peer (module docstring)
            raise TransportClosed(
                CLOSE_NO_STATUS if code in (None, CLOSE_ABNORMAL) else int(code),
                message.get("reason"),
            )
        text = message.get("text")
        if text is not None:
            return str(text)
        data = message.get("bytes")
        return bytes(data) if data is not None else b""

    async def aclose(self, code: int, reason: str | None) -> None:
        if self._connection is not None:
            self._connection.stop_pings()  # none after the close frame
        try:
            if not self._peer_left and not self._close_sent and self._write_failed is None:
                self._close_sent = True
                if self._in_flight is not None:
                    self._in_flight.release_for_close()  # the close frame goes in at once
                await self._write({"type": "websocket.close", "code": code, "reason": reason or ""})
                # the closing handshake: what the peer still sends, then its close
                while not self._peer_left and self._write_failed is None:
                    if (await self._websocket.receive())["type"] == "websocket.disconnect":
                        self._peer_left = True
            else:
                await trio.lowlevel.checkpoint()
        except trio.Cancelled:
            # the close did not get through in time (a peer that does not read): drop it
            if self._connection is not None and not self._peer_left:
                self._connection.abort()
            raise


__all__ = ["ANY_WEBSOCKET_PATH", "AsgiTransport", "market_websocket_routes"]
