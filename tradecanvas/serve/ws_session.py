"""The /ws/market endpoint, whichever transport carries it (DESIGN §3, §6, §10): one
:class:`MarketEndpoint` for the daemon, served on the WS port (``ws_server``, trio-websocket)
and on the HTTP port (``ws_asgi``, Starlette under Hypercorn) with the same Hub, the same
rules and the same session code.

What a transport does: it answers the upgrade request with :meth:`MarketEndpoint.admit`
(404 for another path, 403 for a disallowed ``Origin``, 503 while shutting down or with
``max_connections`` admitted already), accepts the rest, and hands the connection to
:meth:`MarketEndpoint.serve` as a :class:`SessionTransport` — one text message sent, one
message received, a bounded close — translating its library's "closed" into
:class:`~tradecanvas.serve.subscriber.TransportClosed` once.

The connection limit counts admissions (:class:`Admission`), not attached subscribers: the
slot is taken when the upgrade is admitted, before the transport's 101 is written, so
handshakes admitted at the same moment cannot pass the limit. It is given back once: by
:meth:`MarketEndpoint.serve` when the session detaches, or by the transport (its
``finally``) when the connection ends before the session starts — a failed, cancelled or
abandoned accept.

What the session does, per connection (task tree of :meth:`MarketEndpoint.serve`)::

    serve                                  attach to the Hub; at the end detach, then close
    └─ subscriber.cancel_scope
       ├─ Hub.run_publisher                sends what is queued (candles, system, pong, error)
       ├─ StallWatch.watch                 registers the connection's stall clock; one
       │                                   session at a time runs the sweep for them all
       └─ reader loop                      client messages; never awaits a send

Besides its publish task, the Hub's publishing itself writes to the connection's
``frames`` (the transport's pre-framed writer, WS port only) when the subscriber is idle and
caught up and the socket takes the bytes at once (``tradecanvas.serve.hub``).

The rules themselves are pure, in ``ws_protocol``: message parsing, the token bucket, the
handshake. Inbound limits: a message over 64 KiB closes with 1009 (the transports' own limit,
and this session's check for a transport whose limit is a looser backstop); every other bad
message gets an ``error`` and the connection stays up; a client over the rate limit for 5 s
is closed with 1008.

Slow consumers (DESIGN §6): besides the queue's rules and the publish task's send timeout,
the endpoint's :class:`~tradecanvas.serve.stall_watch.StallWatch` samples every
connection's :class:`~tradecanvas.serve.in_flight.InFlight` in one sweep every
``stall_timeout_s / STALL_SAMPLES`` seconds and closes a subscriber with 4008 once the
oldest byte written to it has gone unread for ``stall_timeout_s``
(``subscriber_stall_timeout_s``), counting every pong the daemon had received by then.
Read means proven by a pong to a ping written after it (``InFlight.prove_reads``, at most
one ping per half stall timeout, asked for by the sweep), or acknowledged by TCP where a
transport has no pings: a client that stops reading is closed within that time of
stopping, whatever the buffer sizes, and its close frame fits behind the bounded bytes in flight.
Every 4008 is counted by cause (``tradecanvas_slow_consumer_closes_total``); the
subscribers' queues and lag are on /metrics at each scrape (``ops.metrics.SubscriberStatistics``).

Closing: the first close decision wins (the Subscriber keeps it); the session sends the close
frame once its tasks have unwound, within :data:`CLOSE_TIMEOUT_S` (shielded): a peer that does
not read in time has its connection dropped by the transport. :meth:`MarketEndpoint.shutdown`
refuses new connections and closes every session, on both ports, with 1001.

Errors: none escape :meth:`MarketEndpoint.serve` but cancellation; a failing connection is
that connection's end, counted by its disconnect reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final, Protocol, final

import trio

from tradecanvas.errors import ClientMessageError
from tradecanvas.model import SeriesId
from tradecanvas.ops.metrics import SubscriberSample
from tradecanvas.serve.hub import Hub
from tradecanvas.serve.in_flight import InFlight
from tradecanvas.serve.served import describe_served
from tradecanvas.serve.stall_watch import StallWatch
from tradecanvas.serve.subscriber import FrameWriter, MessageSocket, Subscriber, TransportClosed
from tradecanvas.serve.ws_protocol import (
    CLOSE_ABNORMAL,
    CLOSE_GOING_AWAY,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_SLOW_CONSUMER,
    CLOSE_TOO_BIG,
    MAX_MESSAGE_BYTES,
    HandshakeRefusal,
    InboundLimits,
    PingRequest,
    RateLimiter,
    SubscribeRequest,
    parse_client_message,
    refuse_handshake,
)

log = logging.getLogger(__name__)

# a closing handshake that takes longer is abandoned and the connection dropped
CLOSE_TIMEOUT_S: Final = 2.0
# subscriber_stall_timeout_s's default (DESIGN §6, §7)
DEFAULT_STALL_TIMEOUT_S: Final = 30.0


class SessionTransport(MessageSocket, Protocol):
    """One accepted WebSocket connection, as a session uses it.

    ``send_message`` (the Hub's :class:`MessageSocket`) and ``get_message`` raise
    :class:`TransportClosed` once the peer has ended the connection. ``aclose`` sends the
    close frame and waits for the peer's answer; the caller bounds it, and a transport
    cancelled inside it drops the connection (so no close outlives its deadline)."""

    async def get_message(self) -> str | bytes: ...

    async def aclose(self, code: int, reason: str | None) -> None: ...

    @property
    def frames(self) -> FrameWriter | None:
        """Its pre-framed writer (the WS port's transport), or None (the HTTP port's)."""
        ...

    @property
    def in_flight(self) -> InFlight | None:
        """Its socket's in-flight budget and stall clock (None: a transport without one)."""
        ...


@final
class Admission:
    """One connection's slot under :attr:`MarketEndpoint.max_connections`, taken by
    :meth:`MarketEndpoint.admit`. :meth:`release` gives it back; only the first call counts,
    so the session and the transport's ``finally`` may both call it."""

    __slots__ = ("_give_back", "_released")

    def __init__(self, give_back: Callable[[], None]) -> None:
        self._give_back = give_back
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._give_back()


@final
class MarketEndpoint:
    """/ws/market for every transport: the handshake rules, one session per connection, and
    the shutdown of them all. Owns no task: each transport runs :meth:`serve` in its own
    connection's task; the Hub owns the registry of the sessions' subscribers."""

    def __init__(
        self,
        hub: Hub,
        *,
        allowed_origins: Sequence[str],
        max_subscriptions: int,
        limits: InboundLimits | None = None,
        stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
        max_connections: int | None = None,
    ) -> None:
        self.stalls = StallWatch(stall_timeout_s)
        self.hub = hub
        self.allowed_origins = tuple(allowed_origins)
        self.max_subscriptions = max_subscriptions
        self.limits = limits or InboundLimits()
        # /ws/market connections open at once, both ports together (None: no limit)
        self.max_connections = max_connections
        self._closing = False
        self._admitted = 0
        hub.metrics.subscriber_statistics.source = self._subscriber_samples

    def _subscriber_samples(self) -> list[SubscriberSample]:
        """Each attached subscriber's queue and lag, for /metrics."""
        try:
            now = trio.current_time()
        except RuntimeError:  # scraped outside trio (a test rendering the metrics)
            now = None
        samples: list[SubscriberSample] = []
        for subscriber in self.hub.subscribers():
            queue = subscriber.queue
            lag = 0.0
            if queue.lagging_since is not None and now is not None:
                lag = now - queue.lagging_since
            in_flight = subscriber.in_flight
            samples.append(
                SubscriberSample(
                    queued=queue.queued,
                    lagging=queue.lagging_since is not None,
                    in_flight_bytes=in_flight.in_flight if in_flight is not None else 0,
                    behind_s=max(lag, in_flight.behind_s if in_flight is not None else 0.0),
                )
            )
        return samples

    @property
    def closing(self) -> bool:
        return self._closing

    @property
    def admitted(self) -> int:
        """Connections holding an :class:`Admission`: accepting, or in session."""
        return self._admitted

    def admit(self, target: str, origin: str | None) -> Admission | HandshakeRefusal:
        """Admit an upgrade request for ``target`` with this ``Origin`` header — a slot
        under ``max_connections``, which the caller must release (passing it to
        :meth:`serve` does) — or the HTTP answer that refuses it
        (:func:`~.ws_protocol.refuse_handshake`; counted by reason)."""
        refusal = refuse_handshake(
            target,
            origin,
            self.allowed_origins,
            closing=self._closing,
            connections=self._admitted,
            max_connections=self.max_connections,
        )
        if refusal is not None:
            self.hub.metrics.ws_refusals_total.labels(reason=refusal.reason).inc()
            return refusal
        self._admitted += 1
        return Admission(self._release)

    def _release(self) -> None:
        self._admitted -= 1

    def shutdown(self) -> None:
        """Refuse new connections (503) and close every session with 1001. Idempotent;
        the transports wait (bounded) for their connections to end."""
        self._closing = True
        self.hub.close_all(CLOSE_GOING_AWAY, "server shutdown", disconnect_reason="shutdown")

    async def serve(self, transport: SessionTransport, peer: str, admission: Admission) -> None:
        """Run one accepted connection's session until it ends, then close it (bounded,
        shielded); ``admission`` (from :meth:`admit`) is released when the session detaches.
        ``peer`` names it in logs and in publish failures."""
        subscriber = self.hub.attach(
            transport,
            peer=peer,
            max_subscriptions=self.max_subscriptions,
            frames=transport.frames,
        )
        subscriber.in_flight = transport.in_flight
        log.debug("ws %s: connected", peer)
        if self._closing:  # shut down while this connection was being accepted
            subscriber.close(CLOSE_GOING_AWAY, "server shutdown", disconnect_reason="shutdown")
        try:
            with subscriber.cancel_scope:
                async with trio.open_nursery() as tasks:
                    tasks.start_soon(self.hub.run_publisher, subscriber)
                    if subscriber.in_flight is not None:
                        tasks.start_soon(self.stalls.watch, subscriber, subscriber.in_flight)
                    await self._read_loop(transport, subscriber)
                    tasks.cancel_scope.cancel()
        finally:
            self.hub.detach(subscriber)
            admission.release()
            if subscriber.close_code == CLOSE_SLOW_CONSUMER:
                cause = subscriber.slow_cause or "send_timeout"
                self.hub.metrics.slow_consumer_closes_total.labels(cause=cause).inc()
            code = subscriber.close_code or CLOSE_NORMAL
            with trio.CancelScope(shield=True, deadline=trio.current_time() + CLOSE_TIMEOUT_S):
                await transport.aclose(code, subscriber.close_reason)
            log.debug("ws %s: closed (%s)", peer, subscriber.disconnect_reason)

    async def _read_loop(self, transport: SessionTransport, subscriber: Subscriber) -> None:
        limiter = RateLimiter(self.limits, trio.current_time())
        while True:
            try:
                raw = await transport.get_message()
            except TransportClosed as exc:
                if exc.code == CLOSE_TOO_BIG:  # the transport's own size limit
                    subscriber.close(
                        CLOSE_TOO_BIG, "message too big", disconnect_reason="message_too_big"
                    )
                elif exc.code is None or exc.code == CLOSE_ABNORMAL:
                    subscriber.fail(
                        "connection lost without a close handshake",
                        disconnect_reason="connection_lost",
                    )
                else:
                    subscriber.mark_client_closed()
                return
            if len(raw) > MAX_MESSAGE_BYTES:  # counted like trio-websocket: characters of text
                subscriber.close(
                    CLOSE_TOO_BIG, "message too big", disconnect_reason="message_too_big"
                )
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
                self.hub.metrics.ws_rate_limited_total.inc()
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
                "unknown_series",
                f"{sid} is not ingested or derived by this daemon;"
                f" {describe_served(sid, self.hub.series)}",
                sid,
            )
        self.hub.unsubscribe(subscriber, series)


__all__ = [
    "CLOSE_TIMEOUT_S",
    "DEFAULT_STALL_TIMEOUT_S",
    "Admission",
    "MarketEndpoint",
    "SessionTransport",
    "TransportClosed",
]
