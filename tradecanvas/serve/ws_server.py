"""The /ws/market WebSocket server (DESIGN §3, §6): the trio shell around
:mod:`tradecanvas.serve.ws_protocol`, on trio-websocket.

Task tree of :func:`serve_ws_market`::

    serve_ws_market                       waits for cancellation, then drains (shielded)
    └─ _MarketServer.run                  shielded scope: only the drain may end it
       └─ connections nursery
          ├─ accept loop (trio.serve_listeners)
          └─ one handler per TCP connection
             ├─ trio-websocket reader task (inbound frames, WS pings)
             └─ subscriber.cancel_scope
                ├─ Hub.run_publisher      the only task that sends candles/system/pong/error
                └─ reader loop            parses client messages, never awaits a send

The protocol rules — message parsing, the token bucket, the Origin check — live in
``ws_protocol`` and are tested without sockets; the handler only wires them up. Which
connections exist is the Hub's registry (:meth:`Hub.attach` / :meth:`Hub.detach`).

Inbound rules: a request for another path gets 404, a disallowed ``Origin`` 403 (no
``Origin`` header is allowed: it is not a browser). A message over 64 KiB closes with 1009
(trio-websocket's ``max_message_size``). Every other bad message gets an ``error`` and the
connection stays up; client messages are rate limited by a token bucket (20/s, bursts of 40)
and a client that stays over the limit for 5 s is closed with 1008.

Shutdown: cancelling :func:`serve_ws_market` stops accepting, closes every subscriber with
1001 (:meth:`Hub.close_all`) and waits for the closing handshakes for at most
``SHUTDOWN_GRACE_S`` (shielded).

Each connection's TCP stream is wrapped in a
:class:`~tradecanvas.serve.frame_safe_stream.FrameSafeStream`, so a send the Hub cancels
for its timeout never leaves half a frame before the 4008 close frame.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from typing import Final, final

import trio
import trio_websocket

from tradecanvas.errors import ClientMessageError
from tradecanvas.model import SeriesId
from tradecanvas.serve.frame_safe_stream import FrameSafeStream
from tradecanvas.serve.hub import Hub
from tradecanvas.serve.subscriber import Subscriber
from tradecanvas.serve.ws_protocol import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    MAX_MESSAGE_BYTES,
    WS_PATH,
    InboundLimits,
    PingRequest,
    RateLimiter,
    SubscribeRequest,
    header,
    origin_allowed,
    parse_client_message,
    request_path,
)

log = logging.getLogger(__name__)

# inbound messages trio-websocket buffers before it stops reading the socket; our reader
# handles each one without awaiting, so a few are plenty
INBOUND_QUEUE: Final = 4
HANDSHAKE_TIMEOUT_S: Final = 10.0
# a closing handshake that takes longer is abandoned and the TCP connection closed
CLOSE_TIMEOUT_S: Final = 2.0
# the whole drain at shutdown; longer than one CLOSE_TIMEOUT_S so every close gets its chance
SHUTDOWN_GRACE_S: Final = 5.0


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "?"
    return f"{host}:{port}"


# --- the server -----------------------------------------------------------------------


@final
class _MarketServer:
    """One /ws/market listener set: owns its connections' nursery (inside ``run``)."""

    def __init__(
        self,
        hub: Hub,
        *,
        allowed_origins: Sequence[str],
        max_subscriptions: int,
        limits: InboundLimits,
    ) -> None:
        self.hub = hub
        self.allowed_origins = tuple(allowed_origins)
        self.max_subscriptions = max_subscriptions
        self.limits = limits
        self._scope = trio.CancelScope(shield=True)
        self._accept_scope = trio.CancelScope()
        self._unattached: set[trio.CancelScope] = set()
        self._closing = False
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
                        listeners,
                        handler_nursery=connections,
                    )
                )
                task_status.started()

    async def shutdown(self) -> None:
        """Stop accepting, close every subscriber with 1001, wait (bounded) for the drain."""
        self._closing = True
        self._accept_scope.cancel()
        for scope in list(self._unattached):
            scope.cancel()
        self.hub.close_all(CLOSE_GOING_AWAY, "server shutdown", disconnect_reason="shutdown")
        with trio.move_on_after(SHUTDOWN_GRACE_S):
            await self._done.wait()
        self._scope.cancel()

    async def _handle_stream(self, stream: trio.SocketStream) -> None:
        safe = FrameSafeStream(stream)
        peer = _peer(stream)
        try:
            async with trio.open_nursery() as nursery:  # owns trio-websocket's reader task
                await self._serve_stream(nursery, safe, peer)
                nursery.cancel_scope.cancel()
        except Exception:
            # one connection's failure (a bug, a library error) never reaches the others
            log.exception("ws %s: connection handler failed", peer)
        finally:
            with trio.CancelScope(shield=True):
                await safe.aclose()

    async def _serve_stream(
        self, nursery: trio.Nursery, stream: FrameSafeStream, peer: str
    ) -> None:
        handshake = trio.CancelScope(deadline=trio.current_time() + HANDSHAKE_TIMEOUT_S)
        self._unattached.add(handshake)
        try:
            with handshake:
                request = await trio_websocket.wrap_server_stream(
                    nursery,
                    stream,
                    message_queue_size=INBOUND_QUEUE,
                    max_message_size=MAX_MESSAGE_BYTES,
                )
                if request_path(request.path) != WS_PATH:
                    log.info("ws %s: 404 for path %r", peer, request.path[:200])
                    await request.reject(
                        404, body=f"not found: only {WS_PATH} is served\n".encode()
                    )
                    return
                origin = header(request.headers, b"origin")
                if not origin_allowed(origin, self.allowed_origins):
                    log.info("ws %s: 403 for Origin %r", peer, origin)
                    await request.reject(403, body=b"origin not allowed\n")
                    return
                if self._closing:
                    await request.reject(503, body=b"shutting down\n")
                    return
                ws = await request.accept()
        finally:
            self._unattached.discard(handshake)
        if handshake.cancelled_caught:
            return
        await self._serve_connection(ws, peer)

    async def _serve_connection(self, ws: trio_websocket.WebSocketConnection, peer: str) -> None:
        subscriber = self.hub.attach(ws, peer=peer, max_subscriptions=self.max_subscriptions)
        log.debug("ws %s: connected", peer)
        try:
            with subscriber.cancel_scope:
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(self.hub.run_publisher, subscriber)
                    await self._read_loop(ws, subscriber)
                    tasks.cancel_scope.cancel()
        finally:
            self.hub.detach(subscriber)
            code = subscriber.close_code or CLOSE_NORMAL
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
                await ws.aclose(code, subscriber.close_reason)
            log.debug("ws %s: closed (%s)", peer, subscriber.disconnect_reason)

    async def _read_loop(
        self, ws: trio_websocket.WebSocketConnection, subscriber: Subscriber
    ) -> None:
        limiter = RateLimiter(self.limits, trio.current_time())
        while True:
            try:
                raw = await ws.get_message()
            except trio_websocket.ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else None
                if code == CLOSE_TOO_BIG:
                    subscriber.close(
                        CLOSE_TOO_BIG, "message too big", disconnect_reason="message_too_big"
                    )
                elif code is None or code == 1006:
                    subscriber.fail(
                        "connection lost without a close handshake",
                        disconnect_reason="connection_lost",
                    )
                else:
                    subscriber.mark_client_closed()
                return
            verdict = limiter.check(trio.current_time())
            if verdict == "abuse":
                subscriber.close(
                    CLOSE_POLICY,
                    f"over the message rate limit for {self.limits.abuse_after_s:g}s",
                    disconnect_reason="rate_limited",
                )
                return
            if verdict == "limited":
                subscriber.send_control(self.limits.rate_limited_error().to_wire())
                continue
            if verdict == "ignored":
                continue
            self._handle_message(subscriber, raw)

    def _handle_message(self, subscriber: Subscriber, raw: str | bytes) -> None:
        try:
            request = parse_client_message(raw)
            if isinstance(request, PingRequest):
                subscriber.send_control({"type": "pong"})
            elif isinstance(request, SubscribeRequest):
                self.hub.subscribe(
                    subscriber,
                    request.series,
                    request.since,
                    request.supports_batch,
                    events_after=request.events_after,
                )
            else:
                self._unsubscribe(subscriber, request.series)
        except ClientMessageError as exc:  # ours, or the Hub refusing a subscribe
            subscriber.send_control(exc.to_wire())

    def _unsubscribe(self, subscriber: Subscriber, series: SeriesId) -> None:
        sid = str(series)
        if sid not in self.hub.series:
            raise ClientMessageError(
                "unknown_series", f"{sid} is not ingested or derived by this daemon", sid
            )
        self.hub.unsubscribe(subscriber, series)


async def serve_ws_market(
    hub: Hub,
    *,
    host: str,
    port: int,
    allowed_origins: Sequence[str],
    max_subscriptions: int,
    limits: InboundLimits | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ws://{host}:{port}/ws/market until cancelled; ``started(bound_port)`` once
    listening. On cancellation every subscriber is closed with 1001 within a bounded,
    shielded drain. Raises OSError if the port cannot be bound."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound_port = int(listeners[0].socket.getsockname()[1])
    server = _MarketServer(
        hub,
        allowed_origins=allowed_origins,
        max_subscriptions=max_subscriptions,
        limits=limits or InboundLimits(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(server.run, listeners)
        log.info("serving ws://%s:%d%s", host, bound_port, WS_PATH)
        task_status.started(bound_port)
        try:
            await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await server.shutdown()


__all__ = ["serve_ws_market"]
