"""One /ws/market connection as the Hub sees it (DESIGN §3, §6): its subscriber queue, its
cancel scopes, its wake-up event and how it ended.

The trio half of a subscriber: the rules of what is queued and dropped are the
:class:`~tradecanvas.serve.subscriber_queue.SubscriberQueue`'s; this object turns the queue's
callbacks into a wake-up :class:`trio.Event` and the lag deadline of :attr:`lag_scope`, and
its close decisions into a cancelled :attr:`cancel_scope`. The Hub makes it
(``Hub.attach``), its publish task drains it, the connection's session
(``tradecanvas.serve.ws_session``) reads how it ended (:attr:`close_code`,
:attr:`close_reason`, :attr:`disconnect_reason`).
"""

from __future__ import annotations

import logging
import math
from typing import Protocol, final

import trio

from tradecanvas.ops.metrics import DeliveryBatch
from tradecanvas.serve.in_flight import InFlight
from tradecanvas.serve.subscriber_queue import CloseDecision, SubscriberQueue
from tradecanvas.serve.ws_protocol import CLOSE_GOING_AWAY, CLOSE_SLOW_CONSUMER
from tradecanvas.wire.json import dumps

log = logging.getLogger(__name__)


class TransportClosed(Exception):
    """The peer ended the connection. Each transport translates its library's "closed"
    into this, once (``ws_server`` from trio-websocket, ``ws_asgi`` from the ASGI server).

    ``code`` is the close code the peer sent; None when the connection ended without a close
    handshake (lost). A transport that cannot tell says :data:`~.ws_protocol.CLOSE_NO_STATUS`.
    """

    def __init__(self, code: int | None, reason: str | None = None) -> None:
        super().__init__(f"connection closed ({code if code is not None else 'lost'})")
        self.code = code
        self.reason = reason


class MessageSocket(Protocol):
    """What the publish task needs from a connection: one text message sent (a whole frame,
    or none of it if cancelled before it began).

    ``send_message`` raises :class:`TransportClosed` once the connection is gone (or
    ``trio.BrokenResourceError`` / ``trio.ClosedResourceError`` from the stream under it).
    """

    async def send_message(self, message: str) -> None: ...


class FrameWriter(Protocol):
    """A connection that takes pre-framed WebSocket messages (``encoded.Encoded.frame``):
    the same bytes for every subscriber, written as they are (the WS port's; the HTTP port's
    connections have none and get ``send_message``).

    ``write_nowait`` writes at once without blocking: True when all of it went out, False
    when part did and the rest waits for ``flush`` (it is committed: nothing else is written
    before it); raises ``trio.WouldBlock`` when nothing could be written now. ``write`` waits
    until all of it went out. Both raise :class:`TransportClosed` once the connection is
    closing or closed (and ``trio.BrokenResourceError`` / ``trio.ClosedResourceError``)."""

    @property
    def needs_flush(self) -> bool: ...

    def write_nowait(self, frames: bytes) -> bool: ...

    async def write(self, frames: bytes) -> None: ...

    async def flush(self) -> None: ...


@final
class Subscriber:
    """One /ws/market connection as the Hub sees it: its :attr:`queue` (subscriptions and
    what is queued for them), its cancel scopes and how it ended. Made by
    :meth:`Hub.attach`; the session calls :meth:`Hub.subscribe`, :meth:`Hub.unsubscribe`
    and :meth:`send_control` from its reader.

    ``frames`` is the connection's :class:`FrameWriter`, if it has one: the Hub then writes
    to it at once, from the publishing task, while the publish task is :attr:`parked` and
    the queue idle (:attr:`idle`)."""

    __slots__ = (
        "_wakeup",
        "cancel_scope",
        "close_code",
        "close_reason",
        "detached",
        "disconnect_reason",
        "failure",
        "frames",
        "in_flight",
        "lag_scope",
        "max_subscriptions",
        "owed",
        "parked",
        "peer",
        "queue",
        "send_scope",
        "slow_cause",
        "socket",
        "unsent",
    )

    def __init__(
        self,
        socket: MessageSocket,
        peer: str,
        max_subscriptions: int,
        *,
        queue_max: int,
        max_lag_s: float,
        catchup_limit: int,
        frames: FrameWriter | None = None,
    ) -> None:
        self.socket = socket
        self.frames = frames
        self.peer = peer
        self.max_subscriptions = max_subscriptions
        self.cancel_scope = trio.CancelScope()
        # the publish task runs inside it; its deadline is the queue's lag deadline
        self.lag_scope = trio.CancelScope()
        # inside the lag scope: its deadline is the send in progress's, else inf
        self.send_scope = trio.CancelScope()
        # the publish task waits in wait_ready (nothing of a drain in progress)
        self.parked = False
        # batches queued for this subscriber since its last drain began (delivery timing)
        self.owed: list[DeliveryBatch] = []
        # frames the Hub committed to it at once (``Hub.corked``) that its socket did not
        # take then: the publish task writes them before anything else
        self.unsent = b""
        self._wakeup = trio.Event()
        self.queue = SubscriberQueue(
            queue_max=queue_max,
            max_lag_s=max_lag_s,
            catchup_limit=catchup_limit,
            wake=self._wake,
            lag_changed=self._lag_changed,
        )
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.disconnect_reason: str | None = None
        self.failure: str | None = None
        # a 4008's cause (subscriber_queue.SLOW_CONSUMER_CAUSES)
        self.slow_cause: str | None = None
        # the connection's in-flight budget and stall clock (set by the session, if any)
        self.in_flight: InFlight | None = None
        self.detached = False

    @property
    def closing(self) -> bool:
        return self.queue.closing

    @property
    def idle(self) -> bool:
        """The Hub may write to :attr:`frames` at once: the publish task is parked, not
        woken, and the queue holds nothing (per series, ``subscription.in_step`` decides)."""
        return self.parked and not self._wakeup.is_set() and self.queue.idle and not self.unsent

    @property
    def woken(self) -> bool:
        """The publish task has a drain to do (it settles :attr:`owed` after it)."""
        return self._wakeup.is_set()

    def _wake(self) -> None:
        if not self._wakeup.is_set():
            self._wakeup.set()

    def wake(self) -> None:
        """Make the publish task run a drain (after a write that left bytes to flush)."""
        self._wake()

    def owe(self, batch: DeliveryBatch) -> None:
        """This subscriber's publish task will send some of ``batch`` in its next drain."""
        if not self.owed or self.owed[-1] is not batch:
            self.owed.append(batch)
            batch.owed += 1

    def take_owed(self) -> list[DeliveryBatch]:
        owed, self.owed = self.owed, []
        return owed

    async def wait_ready(self) -> None:
        """Wait until something was queued since the last call (the publish task's wait)."""
        self.parked = True
        try:
            await self._wakeup.wait()
        finally:
            self.parked = False
        self._wakeup = trio.Event()

    def _lag_changed(self, deadline: float) -> None:
        self.lag_scope.deadline = deadline
        if deadline < math.inf:
            log.info("subscriber %s is lagging; it will heal from the store", self.peer)
        else:
            log.info("subscriber %s healed from the store", self.peer)

    def close(
        self, code: int, reason: str, *, disconnect_reason: str, cause: str | None = None
    ) -> None:
        """Decide to close with ``code`` (the first decision wins) and cancel the connection.
        ``cause``: a 4008's (``subscriber_queue.SLOW_CONSUMER_CAUSES``); a 4008 without one
        is the publish task's send timeout.

        The session sends the close frame once the scope has unwound."""
        if self.close_code is None and self.failure is None:
            self.close_code = code
            self.close_reason = reason
            self.disconnect_reason = disconnect_reason
            if code == CLOSE_SLOW_CONSUMER:
                self.slow_cause = cause or "send_timeout"
            level = logging.DEBUG if code == CLOSE_GOING_AWAY else logging.INFO
            log.log(level, "closing subscriber %s: %s %s", self.peer, code, reason)
        self.queue.mark_closing()
        self.cancel_scope.cancel()

    def close_for(self, decision: CloseDecision) -> None:
        """:meth:`close` as the subscriber queue decided."""
        self.close(
            decision.code,
            decision.reason,
            disconnect_reason=decision.disconnect_reason,
            cause=decision.cause,
        )

    def fail(self, description: str, *, disconnect_reason: str) -> None:
        """The connection broke (the client went away without a close frame): end this
        subscriber, logged here once; no publish reports it (``serve/hub.py``)."""
        if self.failure is None and self.close_code is None:
            self.failure = description
            self.disconnect_reason = disconnect_reason
            log.info("subscriber %s went away: %s", self.peer, description)
        self.queue.mark_closing()
        self.cancel_scope.cancel()

    def mark_client_closed(self) -> None:
        """The peer closed the connection with a close frame (a normal end)."""
        if self.disconnect_reason is None:
            self.disconnect_reason = "client_closed"

    def send_control(self, message: dict[str, object]) -> None:
        """Queue a pong or error for this connection (never blocks)."""
        decision = self.queue.offer_message(dumps(message), trio.current_time())
        if decision is not None:
            self.close_for(decision)


__all__ = ["FrameWriter", "MessageSocket", "Subscriber", "TransportClosed"]
