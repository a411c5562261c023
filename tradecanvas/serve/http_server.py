"""Serving ASGI apps with Hypercorn's trio worker: the one place its configuration lives
(the daemon's HTTP API — with /ws/market on the same port — and ``tradecanvas replay`` both
use it).

:func:`serve_http` binds the socket itself (``port=0`` gives a known port and a failed bind
raises OSError before anything starts) and runs the accept loop itself, handing each TCP
connection to Hypercorn's per-connection server, so that it can keep hold of the
connections and bound the drain::

    serve_http                    waits for cancellation, then drains (shielded, bounded)
    └─ _serve_connections         lifespan, then the connections
       ├─ accept loop             until the drain starts; then the listener is closed
       └─ one hypercorn TCPServer per connection, HTTP/1.1 only
          (``tradecanvas.serve.http1_only``; a ServedConnection, reachable from the ASGI
          scope: :func:`served_connection`)

Why not ``hypercorn.trio.serve``: Hypercorn writes to a socket in a shielded scope, so a
peer that stops reading (a WebSocket subscriber, a large answer) blocks its connection — and
the cancellation at the end of the drain — for as long as the peer lives. Closing the socket
(:meth:`ServedConnection.abort`) ends such a write at once; the drain does that to every
connection still open at its deadline, and the /ws/market session to its own connection when
its close cannot get through.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Final, NoReturn, cast, final

import hypercorn.config
import hypercorn.trio
import trio
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ASGIFramework, ConnectionState
from hypercorn.utils import wrap_app
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tradecanvas.errors import ListenError
from tradecanvas.ops.logs import ThrottledCount
from tradecanvas.serve.client_frames import (
    FLOOD_CLOSE_S,
    MAX_READ_MESSAGE_BYTES,
    OP_PING,
    ClientFault,
    ClientFrames,
    close_frame,
    hypercorn_extensions,
    log_client_fault,
    peer_of,
    ping_limit,
)
from tradecanvas.serve.http1_only import Http11Server
from tradecanvas.serve.listening import bind_socket, bind_text
from tradecanvas.serve.shedding import Gate, Place, SheddingListener

log = logging.getLogger(__name__)

# Graceful drain of in-flight requests on shutdown. The daemon must exit within 10 s of
# SIGTERM (the unit's TimeoutStopSec is above that) and other services drain alongside.
HTTP_DRAIN_S: Final = 5.0
# The drain ends HTTP_DRAIN_S after it starts (connections still open are aborted); this is
# the hard stop on top of it (the lifespan's shutdown) before its whole scope is cancelled.
_HARD_STOP_GRACE_S: Final = 1.0
# Hypercorn's own WebSocket message limit (characters of text): a backstop above /ws/market's
# 64 KiB, which the session checks itself so that its 1009 is counted like the WS port's. The
# connection's ClientFrames closes a message past MAX_READ_MESSAGE_BYTES (bytes, inflated)
# before Hypercorn gets them, so this one is never reached: Hypercorn reads on after its own
# 1009, and inflates and keeps all it reads
WEBSOCKET_BACKSTOP_BYTES: Final = MAX_READ_MESSAGE_BYTES
# where a connection's ServedConnection is found in the ASGI scope's "state"
CONNECTION_STATE_KEY: Final = "tradecanvas.connection"
# The send deadline (serve_http's send_timeout_s) is on each step of this many bytes of a
# write: a large answer takes as long as it takes, for a client reading at least this much
# each send_timeout_s (2 KiB/s at the default 30 s; slower is a dead or hostile client)
SEND_STEP_BYTES: Final = 64 * 1024
# at most one log line this often for the clients cut off by it (the others are counted)
SLOW_READER_LOG_S: Final = 10.0


def hypercorn_config(binds: list[str], drain_s: float) -> hypercorn.config.Config:
    """Hypercorn for our servers: the given binds, a bounded graceful drain, our logging."""
    config = hypercorn.config.Config()
    config.bind = list(binds)
    config.graceful_timeout = drain_s
    # our own logging setup formats Hypercorn's messages; no access log (journald volume)
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    config.include_server_header = False
    config.websocket_max_message_size = WEBSOCKET_BACKSTOP_BYTES
    return config


# the connections the send deadline closes: a line at most every SLOW_READER_LOG_S
_SLOW_READERS: Final = ThrottledCount(SLOW_READER_LOG_S)
# connections Hypercorn failed on (a client can provoke h11's LocalProtocolError): likewise
_FAILED_CONNECTIONS: Final = ThrottledCount(SLOW_READER_LOG_S)


@final
class _WatchedStream(trio.abc.HalfCloseableStream):
    """The stream Hypercorn serves a connection over: the connection's own, plus, once the
    connection is a WebSocket (:meth:`ServedConnection.watch_pongs`), the pongs its client
    sends, and pings written between Hypercorn's writes, never inside one.

    Every write, the end of output (``send_eof``) included, holds ``send_lock``: trio
    refuses a second writer on one stream (``BusyResourceError``), and Hypercorn ends a
    connection (``send_eof``) from its reading task while an answer may be being written
    from the app's. The end of input waits for an answer being written (``answering``):
    Hypercorn takes a client's half-close before its request body is complete for the
    connection's end and would close it under the answer.

    With ``send_timeout_s``, a write whose next :data:`SEND_STEP_BYTES` are not taken by the
    client within that many seconds closes the connection (``BrokenResourceError``, which
    Hypercorn takes as the connection's end): Hypercorn's writes are shielded and would
    otherwise wait, holding the answer in memory, for as long as the client lives. None for
    a WebSocket (the /ws/market session bounds its own writes)."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self.socket = inner.socket  # what Hypercorn reads the addresses from
        self.send_lock = trio.Lock()
        self.frames: ClientFrames | None = None  # a WebSocket's: pongs, and pings counted
        self.fault: ClientFault | None = None  # what the client sent that ended it
        # set while an HTTP answer is being written (from its start to the app's end)
        self.answering: trio.Event | None = None
        self.send_timeout_s: float | None = None

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self.send_lock:
            timeout_s = self.send_timeout_s
            if timeout_s is None or len(data) == 0:
                await self.inner.send_all(data)
                return
            with memoryview(data) as view:
                for start in range(0, len(view), SEND_STEP_BYTES):
                    with trio.move_on_after(timeout_s) as waited:
                        await self.inner.send_all(view[start : start + SEND_STEP_BYTES])
                    if waited.cancelled_caught:
                        self.inner.socket.close()
                        if (closed := _SLOW_READERS.add(trio.current_time())) is not None:
                            log.info(
                                "HTTP: closed %d connection(s) whose client took less than"
                                " %d KiB of an answer in %gs",
                                closed,
                                SEND_STEP_BYTES // 1024,
                                timeout_s,
                            )
                        raise trio.BrokenResourceError("the client does not read")

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if self.frames is not None:
            try:
                self.frames.feed(data)
            except ClientFault as fault:
                await self._close_for(fault)
        if not data and self.answering is not None:
            await self.answering.wait()  # the answer first, then Hypercorn sees the end
        return data

    async def _close_for(self, fault: ClientFault) -> NoReturn:
        # the close frame if the client takes it soon (between Hypercorn's frames), then the
        # end of the connection: Hypercorn takes BrokenResourceError for it, and reads no more
        self.fault = fault
        with trio.move_on_after(FLOOD_CLOSE_S), contextlib.suppress(trio.TooSlowError, OSError):
            async with self.send_lock:
                await self.inner.send_all(close_frame(fault.code, str(fault)))
        log_client_fault(f"{peer_of(self.socket)} (HTTP port)", fault)
        self.inner.socket.close()
        raise trio.BrokenResourceError(str(fault)) from fault

    async def send_eof(self) -> None:
        async with self.send_lock:
            await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@final
class ServedConnection:
    """One TCP connection :func:`serve_http` hands to Hypercorn.

    A WebSocket on it can prove what its client has read (``tradecanvas.serve.in_flight``):
    Hypercorn neither lets an ASGI app send pings nor passes pongs on, so :meth:`ping` writes
    the ping frame itself, between Hypercorn's writes, and the pongs are picked out of what
    the client sends (:meth:`watch_pongs`); Hypercorn ignores both."""

    def __init__(
        self,
        stream: trio.SocketStream,
        send_timeout_s: float | None = None,
        place: Place | None = None,
    ) -> None:
        self._stream = stream
        self.watched = _WatchedStream(stream)
        self.watched.send_timeout_s = send_timeout_s
        # the pings waiting for their pong, oldest first
        self._pings: dict[bytes, trio.Event] = {}
        self._pings_stopped = False
        self._place = place  # at the port's gate (serve_http), until a session

    def became_session(self) -> None:
        """The connection's WebSocket was admitted: from now on it counts as a session
        (capped by max_connections, not by the port's gate)."""
        if self._place is not None:
            self._place.admitted()

    def watch_pongs(self, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """Read what the client sends from here on (pongs, pings, broken frames), its
        WebSocket request having had ``headers``: call it before the WebSocket is accepted
        (the client sends no frame before the 101 reaches it)."""
        if self.watched.frames is None:
            self.watched.frames = ClientFrames(
                on_pong=self._pong,
                on_ping=ping_limit(trio.current_time),
                extensions=hypercorn_extensions(headers),
            )

    @property
    def fault(self) -> ClientFault | None:
        """What the client sent that ended its WebSocket (read by ``watch_pongs``), if that
        is how it ended: Hypercorn reports it as a connection lost."""
        return self.watched.fault

    def _pong(self, payload: bytes) -> None:
        if payload not in self._pings:
            return  # unsolicited (a heartbeat), or a ping no longer waited for
        while self._pings:  # a pong answers its ping and every one before it (RFC 6455 §5.5.3)
            key = next(iter(self._pings))
            self._pings.pop(key).set()
            if key == payload:
                return

    async def ping(self, payload: bytes) -> None:
        """Write a ping frame with ``payload`` (unique among those waiting, at most 125
        bytes) and wait for its pong. Raises ``trio.ClosedResourceError`` once
        :meth:`stop_pings` was called: no ping follows a close frame."""
        answered = trio.Event()
        async with self.watched.send_lock:
            if self._pings_stopped:
                raise trio.ClosedResourceError("the WebSocket is closing")
            self._pings[payload] = answered
            await self._stream.send_all(bytes([0x80 | OP_PING, len(payload)]) + payload)
        await answered.wait()

    def stop_pings(self) -> None:
        """No ping from now on (call it before the close frame is written)."""
        self._pings_stopped = True

    @property
    def socket(self) -> trio.socket.SocketType:
        """The connection's socket (``tradecanvas.serve.in_flight`` watches it)."""
        return self._stream.socket

    def abort(self) -> None:
        """Close the socket now, whatever Hypercorn is doing with it: a write waiting for a
        peer that does not read fails at once (with ``ClosedResourceError``, which Hypercorn
        takes as the connection's end) instead of waiting out its shield."""
        self._stream.socket.close()


def served_connection(scope: Mapping[str, Any]) -> ServedConnection | None:
    """The connection an ASGI request or WebSocket arrived on, when :func:`serve_http`
    serves it (None under another server)."""
    state = scope.get("state")
    found = state.get(CONNECTION_STATE_KEY) if isinstance(state, Mapping) else None
    return found if isinstance(found, ServedConnection) else None


def _answers_tracked(app: ASGIApp) -> ASGIApp:
    """``app``, marking on its connection's stream (``_WatchedStream.answering``) each HTTP
    request while the app owes its answer: from the app's start (it may await a store read
    before it answers) until it is done, except while it waits for more of the body (it
    must see the body's end), marked again once the body is complete."""

    async def tracked(scope: Scope, receive: Receive, send: Send) -> None:
        connection = served_connection(scope)
        if scope["type"] == "websocket" and connection is not None:
            connection.watched.send_timeout_s = None  # the session bounds its own writes
        if scope["type"] != "http" or connection is None:
            await app(scope, receive, send)
            return
        stream = connection.watched
        answering: trio.Event | None = None

        def arm() -> None:
            nonlocal answering
            answering = stream.answering = trio.Event()

        def done() -> None:
            nonlocal answering
            if answering is not None:
                answering.set()
                if stream.answering is answering:
                    stream.answering = None
                answering = None

        async def receive_tracked() -> Message:
            done()
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                arm()  # the body is complete: what is left is the answer
            return message

        arm()
        try:
            await app(scope, receive_tracked, send)
        finally:
            done()

    return tracked


@final
class _Connections:
    """The open connections of one server: tracked, waited for, aborted."""

    def __init__(self) -> None:
        self._open: set[ServedConnection] = set()
        self._changed = trio.Event()

    @contextlib.contextmanager
    def tracking(self, connection: ServedConnection) -> Iterator[None]:
        self._open.add(connection)
        try:
            yield
        finally:
            self._open.discard(connection)
            self._changed.set()
            self._changed = trio.Event()

    async def wait_closed(self) -> None:
        while self._open:
            await self._changed.wait()

    def abort_all(self) -> int:
        for connection in list(self._open):
            connection.abort()
        return len(self._open)


async def serve_http(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    drain_s: float = HTTP_DRAIN_S,
    send_timeout_s: float | None = None,
    gate: Gate | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with Hypercorn until cancelled; then drain.

    With ``send_timeout_s``, an HTTP client that takes less than the next 64 KiB of an answer
    within that many seconds is disconnected (``_WatchedStream``). With ``gate``, a
    connection accepted beyond its caps is reset at once (``tradecanvas.serve.shedding``): a
    connection is pending there until it ends or becomes an admitted /ws/market session
    (:meth:`ServedConnection.became_session`).

    ``task_status.started(port)`` once the socket listens. On cancellation the listener
    closes (new connections are refused), idle keep-alive connections close, and requests
    and WebSockets in flight get up to ``drain_s`` seconds; then every connection still open
    is aborted and the server cancelled. The server runs in a shielded scope, so that the
    caller's cancellation becomes this bounded drain instead of an instant cancel; the
    whole of it is cancelled ``_HARD_STOP_GRACE_S`` after the drain at the latest.
    """
    try:
        sock = await bind_socket(host, port)
    except OSError as exc:
        raise ListenError.of("HTTP", host, port, exc) from exc
    bound = sock.getsockname()[1]
    try:
        sock.listen(hypercorn.config.Config.backlog)
    except OSError as exc:
        sock.close()
        raise ListenError.of("HTTP", host, port, exc) from exc
    except BaseException:
        sock.close()
        raise
    listener = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
    config = hypercorn_config([f"http://{bind_text(host, bound)}"], drain_s)
    shutdown = trio.Event()
    server_scope = trio.CancelScope(shield=True)

    async def run_server(task_status: trio.TaskStatus[None]) -> None:
        with server_scope:
            await _serve_connections(
                app, config, listener, shutdown, send_timeout_s, gate, task_status=task_status
            )

    try:
        async with trio.open_nursery() as nursery:
            try:
                await nursery.start(run_server)
                log.info("HTTP API listening on http://%s", bind_text(host, bound))
                task_status.started(bound)
                await trio.sleep_forever()
            finally:
                shutdown.set()
                hard_stop = trio.current_time() + drain_s + _HARD_STOP_GRACE_S
                server_scope.deadline = min(server_scope.deadline, hard_stop)
    finally:
        listener.socket.close()  # the drain closed it already, unless it never started


async def _serve_connections(
    app: ASGIApp,
    config: hypercorn.config.Config,
    listener: trio.SocketListener,
    shutdown: trio.Event,
    send_timeout_s: float | None,
    gate: Gate | None,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.run.worker_serve`` for one plain-TCP listener, keeping hold of the
    connections (see the module docstring); ends once drained after ``shutdown``."""
    # Starlette's and Hypercorn's ASGI type aliases are spelt differently
    asgi = wrap_app(cast("ASGIFramework", _answers_tracked(app)), config.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(asgi, config, lifespan_state)
    context = WorkerContext(None)
    connections = _Connections()

    async def serve_connection(stream: trio.SocketStream) -> None:
        # entered into the gate by SheddingListener.accept
        with shedding.place() as place:
            connection = ServedConnection(stream, send_timeout_s, place)
            state = ConnectionState({**lifespan_state, CONNECTION_STATE_KEY: connection})
            try:
                with connections.tracking(connection):
                    # typed for TLS streams; a plain one is what Hypercorn's worker passes too
                    await Http11Server(
                        asgi, config, context, state, cast("Any", connection.watched)
                    ).run()
            except Exception as exc:  # one connection's failure never reaches the server
                if (failed := _FAILED_CONNECTIONS.add(trio.current_time())) is not None:
                    log.error("HTTP: %d connection(s) ended by a server error: %r", failed, exc)

    shedding = Gate.unlimited("HTTP port") if gate is None else gate
    accepted = SheddingListener(listener, shedding)

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as accepting:
                await accepting.start(
                    functools.partial(
                        trio.serve_listeners, serve_connection, [accepted], handler_nursery=handlers
                    )
                )
                task_status.started()
                await shutdown.wait()
                accepting.cancel_scope.cancel()
            await listener.aclose()  # new connections are refused from here on
            await context.terminated.set()  # idle keep-alive connections close themselves
            with trio.move_on_after(config.graceful_timeout):
                await connections.wait_closed()
            aborted = connections.abort_all()
            if aborted:
                log.info("HTTP drain: aborted %d connection(s) still open", aborted)
            handlers.cancel_scope.cancel()
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
