"""/ws/market on its own port (DESIGN §3, §6): trio-websocket as a transport of the session in
:mod:`tradecanvas.serve.ws_session`.

Task tree of :func:`serve_ws_port`::

    serve_ws_port                         waits for cancellation, then drains (shielded)
    └─ _MarketServer.run                  shielded scope: only the drain may end it
       └─ connections nursery
          ├─ accept loop (trio.serve_listeners)
          └─ one handler per TCP connection
             ├─ trio-websocket reader task (inbound frames, WS pings)
             └─ MarketEndpoint.serve      the session: publish task and reader loop

This module owns the sockets: the handshake (answered with :meth:`MarketEndpoint.admit`,
within ``HANDSHAKE_TIMEOUT_S``; a plain HTTP request, without ``Upgrade: websocket``, is
answered ``426 Upgrade Required`` with a line of text saying where the chart and the HTTP
API are — trio-websocket would send a bare 400), trio-websocket's 64 KiB message limit
(1009), and the translation of trio-websocket's ``ConnectionClosed`` into
``TransportClosed``. Everything a connection does once accepted is the session's, the same
on the HTTP port (``ws_asgi``).

Pending handshakes: a TCP connection counts as pending from its accept until its upgrade is
admitted (it then holds a slot under ``max_connections``) or the connection ends. At most
``max_pending_handshakes`` (:data:`MAX_PENDING_HANDSHAKES`) are pending at once; a connection
accepted beyond that — or beyond the client sockets the open-file limit leaves, a budget
shared with the HTTP port — is closed at once, with a reset, inside the accept loop (no task,
no buffer: :mod:`tradecanvas.serve.shedding`), counted in
``tradecanvas_ws_handshakes_shed_total`` and logged at most once per
``shedding.SHED_LOG_INTERVAL_S``. Connections that never finish their request so cost at
most that many times a handshake's memory, and no more accept work than an accept and a
close.

Shutdown: cancelling :func:`serve_ws_port` stops accepting, abandons handshakes in progress,
calls :meth:`MarketEndpoint.shutdown` (every session, on either port, is closed with 1001)
and waits for this port's connections for at most ``SHUTDOWN_GRACE_S`` (shielded).

Each accepted socket's send buffer is capped and its data writes kept within the in-flight
budget of :mod:`tradecanvas.serve.in_flight`, so a subscriber that stops reading holds little
kernel memory, is noticed by the session's stall watch, and still has room for its close
frame. Each connection's TCP stream is wrapped in a
:class:`~tradecanvas.serve.frame_safe_stream.FrameSafeStream`, so a send the Hub cancels
for its timeout never leaves half a frame before the 4008 close frame; the transport writes
the Hub's pre-framed messages to it directly (the Hub's fast path and its publish tasks'
writes), beside trio-websocket's own writes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Sequence
from typing import Final, final

import h11
import trio
import trio_websocket
from wsproto.utilities import LocalProtocolError

from tradecanvas.errors import ListenError
from tradecanvas.serve.client_frames import peer_of
from tradecanvas.serve.frame_safe_stream import FrameSafeStream
from tradecanvas.serve.hub import Hub
from tradecanvas.serve.in_flight import PING_FRAME_BYTES, InFlight, limit_send_buffer
from tradecanvas.serve.shedding import ClientSockets, Gate, SheddingListener, ws_gate
from tradecanvas.serve.subscriber import TransportClosed
from tradecanvas.serve.ws_protocol import (
    MAX_MESSAGE_BYTES,
    WS_PATH,
    HandshakeRefusal,
    InboundLimits,
    header,
)
from tradecanvas.serve.ws_session import DEFAULT_STALL_TIMEOUT_S, Admission, MarketEndpoint

log = logging.getLogger(__name__)

# inbound messages trio-websocket buffers before it stops reading the socket; our reader
# handles each one without awaiting, so a few are plenty
INBOUND_QUEUE: Final = 4
HANDSHAKE_TIMEOUT_S: Final = 10.0
# TCP connections on the WS port whose upgrade is not admitted yet, at most; beyond it a new
# connection is reset at accept. A burst of this many clients (re)connecting at once is
# served; a pending handshake holds about 10 KiB (its parser, buffers and tasks)
MAX_PENDING_HANDSHAKES: Final = 1024
# the whole drain at shutdown; longer than one ws_session.CLOSE_TIMEOUT_S so every close
# gets its chance
SHUTDOWN_GRACE_S: Final = 5.0
# bytes a read of the request's head takes at most (h11 refuses a head over 16 KiB)
HEAD_READ_BYTES: Final = 16 << 10


# what trio-websocket raises when the client's connection ends during the handshake
_GONE: Final = (
    trio_websocket.ConnectionClosed,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
)


def _peer(stream: trio.SocketStream) -> str:
    return peer_of(stream.socket)


def _closed(exc: trio_websocket.ConnectionClosed) -> TransportClosed:
    if exc.reason is None:
        return TransportClosed(None)
    return TransportClosed(exc.reason.code, exc.reason.reason)


@final
class _TrioWebsocketTransport:
    """A trio-websocket connection as a session transport, and its
    :class:`~tradecanvas.serve.subscriber.FrameWriter`: pre-framed messages go straight to
    the connection's FrameSafeStream, which serializes them with trio-websocket's own writes
    (pongs, the close frame), never after a close. trio-websocket negotiates no extension,
    so a message's frame is the same bytes on every connection. The pre-framed writes keep
    within the connection's in-flight budget (trio-websocket's own small frames need not:
    the budget leaves room for them). Its ``aclose`` is
    cancellable: the connection handler then closes the TCP stream (``_handle_stream``'s
    ``finally``)."""

    __slots__ = ("_ws", "stream")

    def __init__(self, ws: trio_websocket.WebSocketConnection, stream: FrameSafeStream) -> None:
        self._ws = ws
        self.stream = stream

    @property
    def frames(self) -> _TrioWebsocketTransport:
        return self

    @property
    def in_flight(self) -> InFlight | None:
        return self.stream.in_flight

    async def send_message(self, message: str) -> None:
        try:
            await self._ws.send_message(message)
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    def _check_open(self) -> None:
        reason = self._ws.closed
        if reason is not None:
            raise TransportClosed(reason.code, reason.reason)

    @property
    def needs_flush(self) -> bool:
        return self.stream.needs_flush

    def write_nowait(self, frames: bytes) -> bool:
        self._check_open()
        in_flight = self.stream.in_flight
        if in_flight is not None and not in_flight.fits(len(frames)):
            raise trio.WouldBlock
        return self.stream.send_all_nowait(frames)

    async def write(self, frames: bytes) -> None:
        self._check_open()
        in_flight = self.stream.in_flight
        if in_flight is not None:
            await in_flight.wait_room(len(frames))
            self._check_open()
        await self.stream.send_all(frames)

    async def flush(self) -> None:
        await self.stream.flush()

    async def get_message(self) -> str | bytes:
        try:
            return await self._ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            raise _closed(exc) from None

    async def aclose(self, code: int, reason: str | None) -> None:
        if self.stream.in_flight is not None:
            self.stream.in_flight.release_for_close()  # the close frame goes in at once
        await self._ws.aclose(code, reason)


# --- the server -----------------------------------------------------------------------


@final
class _MarketServer:
    """One /ws/market listener set: owns its connections' nursery (inside ``run``)."""

    def __init__(self, endpoint: MarketEndpoint, gate: Gate, http_url: str | None) -> None:
        self.endpoint = endpoint
        self.http_url = http_url  # where a plain HTTP request is sent (None: said in words)
        self._gate = gate
        self._scope = trio.CancelScope(shield=True)
        self._accept_scope = trio.CancelScope()
        self._unattached: set[trio.CancelScope] = set()
        self._done = trio.Event()

    async def run(
        self,
        listeners: list[trio.SocketListener],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with self._scope:
                async with trio.open_nursery() as connections:
                    await connections.start(self._accept, listeners, connections)
                    task_status.started()
        finally:
            self._done.set()

    async def _accept(
        self,
        listeners: list[trio.SocketListener],
        connections: trio.Nursery,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with self._accept_scope:
            async with trio.open_nursery() as accepting:
                await accepting.start(
                    functools.partial(
                        trio.serve_listeners,
                        self._handle_stream,
                        [SheddingListener(listener, self._gate) for listener in listeners],
                        handler_nursery=connections,
                    )
                )
                task_status.started()

    async def shutdown(self) -> None:
        """Stop accepting, close every session with 1001, wait (bounded) for the drain."""
        self._accept_scope.cancel()
        for scope in list(self._unattached):
            scope.cancel()
        self.endpoint.shutdown()
        with trio.move_on_after(SHUTDOWN_GRACE_S):
            await self._done.wait()
        self._scope.cancel()

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        # entered into the gate by SheddingListener.accept: pending until admitted
        with self._gate.place() as place:
            limit_send_buffer(stream.socket)
            safe = FrameSafeStream(stream, InFlight(stream.socket, trio.current_time()))
            peer = _peer(stream)
            try:
                async with trio.open_nursery() as nursery:  # owns trio-websocket's reader task
                    await self._serve_stream(nursery, safe, peer, place.admitted)
                    nursery.cancel_scope.cancel()
            except* _GONE:
                # the client went away before its session began (the session's own end is
                # its business): nothing the daemon did wrong
                log.debug("ws %s: the client went away during the handshake", peer)
            except* Exception:
                # one connection's failure (a bug, a library error) never reaches the others
                log.exception("ws %s: connection handler failed", peer)
            finally:
                with trio.CancelScope(shield=True):
                    await safe.aclose()

    async def _serve_stream(
        self,
        nursery: trio.Nursery,
        stream: FrameSafeStream,
        peer: str,
        admitted: Callable[[], None],
    ) -> None:
        handshake = trio.CancelScope(deadline=trio.current_time() + HANDSHAKE_TIMEOUT_S)
        self._unattached.add(handshake)
        admission: Admission | None = None
        # trio-websocket waits for the request even after the client's input has ended
        watch: trio.CancelScope = await nursery.start(_end_at_end_of_input, stream, handshake)
        try:
            with handshake:
                head, plain = await _read_request_head(stream)
                if plain is not None and not _asks_for_websocket(plain):
                    log.debug("ws %s: a plain HTTP request: answered 426", peer)
                    await stream.send_all(plain_http_answer(plain.method, self.http_url))
                    return
                request = await trio_websocket.wrap_server_stream(
                    nursery,
                    _HeadFirst(stream, head),
                    message_queue_size=INBOUND_QUEUE,
                    max_message_size=MAX_MESSAGE_BYTES,
                )
                verdict = self.endpoint.admit(request.path, header(request.headers, b"origin"))
                if isinstance(verdict, HandshakeRefusal):
                    log.info("ws %s: %s", peer, verdict.why)
                    await request.reject(verdict.status, body=verdict.body)
                    return
                admission = verdict
                admitted()
                stream.watch_pings(peer)  # the client sends no frame before the 101
                ws = await request.accept()
            watch.cancel()
            self._unattached.discard(handshake)
            if handshake.cancelled_caught or admission is None:
                return
            if stream.in_flight is not None:  # the stall clock counts from pongs (in_flight)
                nursery.start_soon(_prove_reads, ws, stream.in_flight)
            await self.endpoint.serve(_TrioWebsocketTransport(ws, stream), peer, admission)
        finally:
            watch.cancel()
            self._unattached.discard(handshake)
            if admission is not None:  # the accept failed or was cancelled: not attached
                admission.release()


async def _read_request_head(stream: trio.abc.ReceiveStream) -> tuple[bytes, h11.Request | None]:
    """Read the client's request head: the bytes read, and the request when they hold a
    whole HTTP/1.x one (None: the input ended first, or it is not HTTP — trio-websocket,
    given the same bytes, refuses it as it always did)."""
    parser = h11.Connection(h11.SERVER)
    head = bytearray()
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError:
            return bytes(head), None
        if isinstance(event, h11.Request):
            return bytes(head), event
        if event is not h11.NEED_DATA:
            return bytes(head), None
        data = await stream.receive_some(HEAD_READ_BYTES)
        head += data
        parser.receive_data(bytes(data))  # b"": the end of the input


def _asks_for_websocket(request: h11.Request) -> bool:
    """``Upgrade: websocket`` among the request's headers (h11 lowercases their names)."""
    return any(
        name == b"upgrade" and b"websocket" in value.lower() for name, value in request.headers
    )


def plain_http_answer(method: bytes, http_url: str | None) -> bytes:
    """The answer to a plain HTTP request on the WS port: 426 Upgrade Required (RFC 9110
    §15.5.22: it names the protocol in ``Upgrade``) with one line of text saying where the
    chart and the HTTP API are (``http_url``; None: the setting that says so). No body for
    HEAD; the connection is closed after it."""
    where = http_url or "the HTTP port (TRADE_CANVAS_HTTP_PORT, 8766 by default)"
    body = (
        f"this port serves WebSocket {WS_PATH} only; the chart and the HTTP API are on {where}\n"
    ).encode()
    headers = (
        "HTTP/1.1 426 Upgrade Required\r\n"
        "Upgrade: websocket\r\n"
        "Connection: Upgrade, close\r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    return headers if method == b"HEAD" else headers + body


@final
class _HeadFirst(trio.abc.HalfCloseableStream):
    """The connection's stream for trio-websocket: the request head read already
    (:func:`_read_request_head`) comes first, then the stream's own bytes; the rest is the
    stream's."""

    __slots__ = ("_head", "stream")

    def __init__(self, stream: trio.abc.HalfCloseableStream, head: bytes) -> None:
        self.stream = stream
        self._head = head

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        if not self._head:
            return await self.stream.receive_some(max_bytes)
        await trio.lowlevel.checkpoint()
        n = len(self._head) if max_bytes is None else max_bytes
        data, self._head = self._head[:n], self._head[n:]
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.stream.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.stream.send_eof()

    async def aclose(self) -> None:
        await self.stream.aclose()


async def _end_at_end_of_input(
    stream: FrameSafeStream,
    handshake: trio.CancelScope,
    task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED,
) -> None:
    # a client gone before its whole request frees its place now, not at the handshake
    # timeout
    with trio.CancelScope() as watch:
        task_status.started(watch)
        await stream.request_abandoned.wait()
        handshake.cancel()


async def _prove_reads(ws: trio_websocket.WebSocketConnection, in_flight: InFlight) -> None:
    # closed, or closing (wsproto refuses a ping then): the proofs end, the clock runs on
    with contextlib.suppress(trio_websocket.ConnectionClosed, LocalProtocolError):
        await in_flight.prove_reads(ws.ping, ping_bytes=PING_FRAME_BYTES)


async def serve_ws_port(
    endpoint: MarketEndpoint,
    *,
    host: str,
    port: int,
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
    sockets: ClientSockets | None = None,
    http_url: str | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``endpoint`` at ws://{host}:{port}/ws/market until cancelled; ``started(bound_port)``
    once listening. A plain HTTP request gets a 426 whose text names ``http_url`` (the
    chart's and the HTTP API's address; None: the setting that gives it). At most
    ``max_pending_handshakes`` connections are in their handshake at once, and with
    ``sockets`` (the budget shared with the HTTP port) at most its limit of client sockets
    are open; more are reset at accept. On cancellation every session is closed with 1001
    within a bounded, shielded drain. Raises ListenError if the port cannot be listened on."""
    try:
        listeners = await trio.open_tcp_listeners(port, host=host)
    except OSError as exc:
        raise ListenError.of("WebSocket clients", host, port, exc) from exc
    bound_port = int(listeners[0].socket.getsockname()[1])
    sockets = ClientSockets(None) if sockets is None else sockets
    gate = ws_gate(sockets, endpoint.hub.metrics, max_pending_handshakes)
    server = _MarketServer(endpoint, gate, http_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run, listeners)
        log.info("serving ws://%s:%d%s", host, bound_port, WS_PATH)
        task_status.started(bound_port)
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await server.shutdown()


async def serve_ws_market(
    hub: Hub,
    *,
    host: str,
    port: int,
    allowed_origins: Sequence[str],
    max_subscriptions: int,
    limits: InboundLimits | None = None,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`serve_ws_port` for an endpoint of its own over ``hub`` (a Hub served on this
    port only, as the benchmarks do; the daemon shares one endpoint between both ports)."""
    endpoint = MarketEndpoint(
        hub,
        allowed_origins=allowed_origins,
        max_subscriptions=max_subscriptions,
        limits=limits,
        stall_timeout_s=stall_timeout_s,
    )
    await serve_ws_port(endpoint, host=host, port=port, task_status=task_status)


__all__ = ["MAX_PENDING_HANDSHAKES", "serve_ws_market", "serve_ws_port"]
