"""The /ws/market WebSocket server (DESIGN §3, §6), on trio-websocket.

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

The protocol logic — message parsing, the token bucket, the Origin check — is plain
functions and classes here, tested without sockets. The handler only wires them up.

Inbound rules: a request for another path gets 404, a disallowed ``Origin`` 403 (no
``Origin`` header is allowed: it is not a browser). A message over 64 KiB closes with 1009
(trio-websocket's ``max_message_size``). Every other bad message gets an ``error`` and the
connection stays up; client messages are rate limited by a token bucket (20/s, bursts of 40)
and a client that stays over the limit for 5 s is closed with 1008.

Shutdown: cancelling :func:`serve_ws_market` stops accepting, closes every subscriber with
1001 and waits for the closing handshakes for at most ``SHUTDOWN_GRACE_S`` (shielded).

Sending and slow sockets: trio-websocket writes each frame with one ``send_all``; the Hub's
send timeout cancels that call. On a plain SocketStream a cancelled ``send_all`` may leave half
a frame on the wire, after which no close frame can be read. :class:`FrameSafeStream` keeps the
unsent rest of a started frame and sends it first with the next write, so the 4008 close frame
that follows a timed-out send is still well-formed for a client that reads again in time.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import Final, final
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket

from tradecanvas.errors import ClientMessageError, SeriesIdError
from tradecanvas.model import SeriesId
from tradecanvas.serve.hub import (
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    Hub,
    Subscriber,
)
from tradecanvas.wire.json import loads

log = logging.getLogger(__name__)

WS_PATH: Final = "/ws/market"
# a client sends a handful of small control messages; a chart's dozen subscribes fit easily
MAX_MESSAGE_BYTES: Final = 64 * 1024
# inbound messages trio-websocket buffers before it stops reading the socket; our reader
# handles each one without awaiting, so a few are plenty
INBOUND_QUEUE: Final = 4
HANDSHAKE_TIMEOUT_S: Final = 10.0
# a closing handshake that takes longer is abandoned and the TCP connection closed
CLOSE_TIMEOUT_S: Final = 2.0
# the whole drain at shutdown; longer than one CLOSE_TIMEOUT_S so every close gets its chance
SHUTDOWN_GRACE_S: Final = 5.0
# since beyond this is not a time in seconds (year 5138): most likely milliseconds
MAX_SINCE: Final = 10**11
CLIENT_TYPES: Final = ("subscribe", "unsubscribe", "ping")


# --- protocol: client messages ---------------------------------------------------------


@attrs.frozen
class SubscribeRequest:
    series: SeriesId
    since: int | None
    supports_batch: bool


@attrs.frozen
class UnsubscribeRequest:
    series: SeriesId


@attrs.frozen
class PingRequest:
    pass


ClientRequest = SubscribeRequest | UnsubscribeRequest | PingRequest


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r:.60}"
    if isinstance(value, list):
        return "array"
    return "object"


def _bad(message: str, series_id: str | None = None) -> ClientMessageError:
    return ClientMessageError("bad_request", message, series_id)


def parse_client_message(raw: str | bytes) -> ClientRequest:
    """Parse one client frame (DESIGN §3). Raises ClientMessageError saying what is wrong."""
    try:
        doc = loads(raw)
    except ValueError as exc:
        raise _bad(f"message is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad(f'message must be a JSON object with a "type", got a JSON {_json_kind(doc)}')
    if "type" not in doc:
        raise _bad('message has no "type"; expected one of: ' + ", ".join(CLIENT_TYPES))
    kind = doc["type"]
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        raise _bad(f"unknown type {_json_kind(kind)}; expected one of: " + ", ".join(CLIENT_TYPES))
    if kind == "ping":
        return PingRequest()
    raw_sid = doc.get("series_id")
    sid_text = raw_sid if isinstance(raw_sid, str) else None
    if raw_sid is None:
        raise _bad(f"{kind} needs a series_id, such as binance:futures:BTC/USDT:1m")
    try:
        series = SeriesId.parse(raw_sid)
    except SeriesIdError as exc:
        raise _bad(str(exc), sid_text) from None
    if kind == "unsubscribe":
        return UnsubscribeRequest(series)
    since = doc.get("since")
    if since is not None:
        if isinstance(since, bool) or not isinstance(since, int):
            raise _bad(
                "since must be null or an integer number of seconds (a candle_time),"
                f" got a {_json_kind(since)}",
                sid_text,
            )
        if since < 0:
            raise _bad(f"since must not be negative, got {since}", sid_text)
        if since > MAX_SINCE:
            raise _bad(
                f"since {since} is too large: candle_time is in seconds, not milliseconds",
                sid_text,
            )
    batch = doc.get("supports_batch", False)
    if batch is None:
        batch = False
    if not isinstance(batch, bool):
        raise _bad(f"supports_batch must be true or false, got a {_json_kind(batch)}", sid_text)
    return SubscribeRequest(series, since, batch)


# --- protocol: inbound limits ----------------------------------------------------------


@attrs.frozen
class InboundLimits:
    """Per-connection limits on what a client sends (DESIGN §6): a token bucket of
    ``messages_per_s`` with bursts of ``burst``; a client whose messages keep being refused
    for ``abuse_after_s`` (no pause of ``quiet_s`` without a refusal) is closed with 1008."""

    messages_per_s: float = 20.0
    burst: int = 40
    abuse_after_s: float = 5.0
    quiet_s: float = 1.0


@final
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. Sans-IO: pass the time in."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@final
class RateLimiter:
    """The token bucket plus the abuse rule. A flood still gets ``messages_per_s`` through,
    so the abuse streak is measured from the first refusal and only ends after ``quiet_s``
    without one."""

    def __init__(self, limits: InboundLimits, now: float) -> None:
        self.limits = limits
        self.bucket = TokenBucket(limits.messages_per_s, limits.burst, now)
        self.limited_since: float | None = None
        self.last_refusal = -math.inf
        self.last_answer = -math.inf

    def check(self, now: float) -> str:
        """``"ok"``, ``"limited"`` (answer rate_limited), ``"ignored"`` (refused without an
        answer) or ``"abuse"`` (close 1008).

        At most one ``rate_limited`` answer per ``quiet_s``: answering every refused message
        would let a flooding client that does not read fill its own queue, and be cut off
        as a slow consumer (4008) instead of for abuse (1008).
        """
        if now - self.last_refusal > self.limits.quiet_s:
            self.limited_since = None
        if self.bucket.take(now):
            return "ok"
        if self.limited_since is None:
            self.limited_since = now
        self.last_refusal = now
        if now - self.limited_since >= self.limits.abuse_after_s:
            return "abuse"
        if now - self.last_answer >= self.limits.quiet_s:
            self.last_answer = now
            return "limited"
        return "ignored"


def origin_allowed(origin: str | None, allowed: Sequence[str]) -> bool:
    """No Origin (not a browser) is allowed; ``*`` allows all; ``scheme://host`` allows any
    port of that host; ``scheme://host:port`` exactly that port."""
    if origin is None or "*" in allowed:
        return True
    try:
        got = urlsplit(origin.strip())
        got_port = got.port
    except ValueError:
        return False
    if not got.scheme or not got.hostname:
        return False
    for entry in allowed:
        try:
            want = urlsplit(entry)
            want_port = want.port
        except ValueError:
            continue
        if want.scheme.lower() != got.scheme.lower() or want.hostname != got.hostname:
            continue
        if want_port is None or want_port == got_port:
            return True
    return False


def _header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


# --- transport ------------------------------------------------------------------------


@final
class FrameSafeStream(trio.abc.HalfCloseableStream):
    """A SocketStream whose cancelled ``send_all`` never leaves half a frame behind.

    If a ``send_all`` is cancelled after part of its bytes went out, the rest is kept and
    sent before the next write's bytes; bytes of a write that never started are dropped
    (that frame was never begun). Everything else is the wrapped SocketStream's. Raises
    ``trio.BrokenResourceError`` / ``trio.ClosedResourceError`` like a SocketStream.
    """

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self._unsent = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.inner.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        payload = self._unsent + bytes(data) if self._unsent else bytes(data)
        self._unsent = b""
        if not payload:
            await self.inner.send_all(b"")
            return
        sent = 0
        try:
            while sent < len(payload):
                sent += await self.inner.socket.send(memoryview(payload)[sent:])
        except OSError as exc:
            if self.inner.socket.fileno() == -1:
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        finally:
            if 0 < sent < len(payload):
                self._unsent = payload[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


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
        self._subscribers: set[Subscriber] = set()
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
        for subscriber in list(self._subscribers):
            subscriber.close(CLOSE_GOING_AWAY, "server shutdown", disconnect_reason="shutdown")
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
                path = request.path.split("?", 1)[0]
                if path != WS_PATH:
                    log.info("ws %s: 404 for path %r", peer, request.path[:200])
                    await request.reject(
                        404, body=f"not found: only {WS_PATH} is served\n".encode()
                    )
                    return
                origin = _header(request.headers, b"origin")
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
        self._subscribers.add(subscriber)
        log.debug("ws %s: connected", peer)
        try:
            with subscriber.cancel_scope:
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(self.hub.run_publisher, subscriber)
                    await self._read_loop(ws, subscriber)
                    tasks.cancel_scope.cancel()
        finally:
            self._subscribers.discard(subscriber)
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
                subscriber.send_control(
                    ClientMessageError(
                        "rate_limited",
                        f"too many messages: at most {self.limits.messages_per_s:g}/s"
                        f" (bursts of {self.limits.burst}); this one was ignored",
                    ).to_wire()
                )
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
                    subscriber, request.series, request.since, request.supports_batch
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


__all__ = [
    "MAX_MESSAGE_BYTES",
    "WS_PATH",
    "ClientMessageError",
    "ClientRequest",
    "FrameSafeStream",
    "InboundLimits",
    "PingRequest",
    "RateLimiter",
    "SubscribeRequest",
    "TokenBucket",
    "UnsubscribeRequest",
    "origin_allowed",
    "parse_client_message",
    "serve_ws_market",
]
