"""Hub: fan-out of closed, forming and system messages to /ws/market subscribers (DESIGN §3, §6).

Ownership and tasks
-------------------
The Hub owns the subscriber registry: which connection holds which subscription, each
subscription's cursor and its pending candles. It owns no task and no nursery. The WS server
(``tradecanvas.serve.ws_server``) owns each connection's lifetime: it calls :meth:`Hub.attach`,
runs :meth:`Hub.run_publisher` — the connection's one **publish task** — next to its reader
inside the :attr:`Subscriber.cancel_scope`, and calls :meth:`Hub.detach` at the end.

Publishing (``publish_closed``, ``publish_system``, ``publish_forming``) is synchronous: it
only puts work on each subscriber's own bounded queue (``_offer_*``, the Hub's ``send_nowait``)
and wakes its publish task; it never awaits a socket. Only the publish task touches the socket.

The subscriber queue
--------------------
A subscriber's queue is not a memory channel: the slow-consumer policy has to drop queued
``candle_forming`` and queued closed candles in place, and the publish task coalesces by series.
So the queue is per subscription — pending closed candles keyed by time, the newest forming
candle — plus an insertion-ordered "ready" list of subscriptions and whole messages (system,
pong, error) that fixes the order in which they go out. Its size is counted in messages as a
non-batch client would get them: one per closed candle, one per forming candle, one per other
message; it never exceeds ``queue_max``.

Coalescing: at each wake-up the publish task takes everything ready and sends, per series, the
closed candles as ONE ``candles_batch`` (split only at a ``gap`` or every ``catchup_limit``
candles) to batch subscribers, or one ``candle_closed`` per candle otherwise, then the newest
``candle_forming`` if it is still above the cursor. A system message for a series never
overtakes the candles published before it.

Cursors, catch-up and healing
-----------------------------
A subscription's cursor is the last closed ``candle_time`` sent; it only moves forward and a
``candle_forming`` is sent only above it. Subscribing registers the subscription at once (live
candles from then on are buffered) and queues its catch-up: the publish task reads the store
(``since`` exclusive, at most ``catchup_limit`` a read and a message; ``since: null`` means the
newest ``catchup_limit``), sends it, and then the buffered live candles, dropping anything at or
below the cursor. Every candle is committed before it is published, so a candle is either in a
store read that started after registration, or in the buffer: no loss, no duplicate.

A hole in what a subscriber would receive (next time > cursor + timeframe, once the cursor is
anchored on a real candle) is first healed from the store (``store.since(series, cursor, …)``);
only a hole the store itself has is reported as ``gap``, and delivery continues after it.

Slow consumers
--------------
When an offer would overflow the queue, the subscriber's queued ``candle_forming`` are dropped
first. If that is not enough the subscriber starts **lagging**: its queued closed candles are
dropped (they are in the store) and, per subscription, the highest dropped time is remembered
as the heal target; further closed candles for a lagging subscription are not queued but only
raise its target. The publish task heals each such subscription from the store up to its
target, and the subscriber stops lagging when none is left to heal. A subscriber is closed
with 4008 (and counted) when it has been lagging continuously for more than ``max_lag_s``
(default three times ``send_timeout_s``), when one send does not complete within
``send_timeout_s``, or when even the dropping leaves no room for a system/control message.
Nobody else notices: the other subscribers and the publishers never wait for it.

Failures and ``best_effort``
----------------------------
A subscriber whose delivery fails — its socket broke under a send, or the peer vanished without
a close handshake — is cancelled and closed by its own task. A publish step that would have
delivered to it reports it (one description per such subscriber, from the next closed/system
publish of one of its series) and then forgets it; an exception raised while queueing for one
subscriber isolates that subscriber (close 1011) and is reported the same way. The caller
(``IngestPipeline.publish``) decides between best effort and ``PublishError``.

Errors: :class:`~tradecanvas.errors.ClientMessageError` (with a protocol ``code``) from
:meth:`Hub.subscribe`. Nothing else is raised to publishers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Final, Protocol, final

import attrs
import trio
import trio_websocket

from tradecanvas.errors import ClientMessageError, StoreError
from tradecanvas.model import Candle, SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline import SystemEvent
from tradecanvas.wire.json import dumps

log = logging.getLogger(__name__)
# close codes with which a client ends its connection normally (RFC 6455 §7.4.1)
CLIENT_GOODBYE_CODES: Final = (1000, 1001)

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SLOW_CONSUMER: Final = 4008
# a lagging subscriber gets this many send timeouts' worth of time to heal before 4008
DEFAULT_MAX_LAG_FACTOR: Final = 3.0
# the cursor of a ``since: null`` subscription whose catch-up found the store empty
EMPTY_STORE_CURSOR: Final = -1
# failure descriptions returned by one publish call at most (the rest are summarised)
MAX_FAILURES_LISTED: Final = 20


class CandleReader(Protocol):
    """The reads the Hub makes (``CandleStore`` has them): ascending lists of candles."""

    async def tail(self, series_id: str, limit: int) -> list[Candle]: ...

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]: ...


class MessageSocket(Protocol):
    """What the publish task needs from a connection (a ``trio_websocket`` connection).

    ``send_message`` raises ``trio_websocket.ConnectionClosed`` once the connection is gone.
    """

    async def send_message(self, message: str) -> None: ...


@attrs.frozen
class HubStatistics:
    subscribers: int
    subscriptions: int
    lagging_subscribers: int
    failed_unreported: int
    messages_sent: int
    candles_sent: int
    gaps_sent: int
    store_syncs: int
    forming_dropped: int
    closed_dropped_for_lag: int
    slow_consumers_closed: int


@attrs.frozen
class SubscriberStatistics:
    peer: str
    queued: int
    lagging: bool
    cursors: tuple[tuple[str, int | None], ...]
    messages_sent: int
    close_code: int | None
    disconnect_reason: str | None


class _Message:
    """A whole queued message (system, pong, error); identity is its place in the queue."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text


@final
class Subscription:
    """One series on one connection: its cursor and its part of the subscriber's queue."""

    __slots__ = (
        "active",
        "anchored",
        "batch",
        "cursor",
        "forming",
        "heal_target",
        "needs_sync",
        "pending",
        "probe_anchor",
        "series_id",
        "subscriber",
        "tf_seconds",
        "use_tail",
        "verified_upto",
    )

    def __init__(
        self, subscriber: Subscriber, series: SeriesId, since: int | None, batch: bool
    ) -> None:
        self.subscriber = subscriber
        self.series_id = str(series)
        self.tf_seconds = series.timeframe.seconds
        self.batch = batch
        # last closed candle_time sent; None until the first one for ``since: null``
        self.cursor: int | None = since
        # gaps are only reported relative to a cursor that is a real stored/sent candle
        self.anchored = False
        self.probe_anchor = since is not None
        self.use_tail = since is None
        self.pending: dict[int, Candle] = {}
        self.forming: Candle | None = None
        self.needs_sync = True
        self.heal_target: int | None = None
        # the newest buffered candle that a store read started after (see Hub._sync)
        self.verified_upto = -1
        self.active = True


@final
class Subscriber:
    """One /ws/market connection as the Hub sees it: its subscriptions, its bounded queue,
    its cancel scope and how it ended. Made by :meth:`Hub.attach`; the WS server calls
    :meth:`Hub.subscribe`, :meth:`Hub.unsubscribe` and :meth:`send_control` from its reader."""

    def __init__(self, hub: Hub, socket: MessageSocket, peer: str, max_subscriptions: int) -> None:
        self.hub = hub
        self.socket = socket
        self.peer = peer
        self.max_subscriptions = max_subscriptions
        self.cancel_scope = trio.CancelScope()
        self.subscriptions: dict[str, Subscription] = {}
        self._ready: dict[Subscription | _Message, None] = {}
        self._wakeup = trio.Event()
        self._queued = 0
        self.lagging_since: float | None = None
        # the publish task runs inside it; its deadline is max_lag_s after lagging starts
        self.lag_scope = trio.CancelScope()
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.disconnect_reason: str | None = None
        self.failure: str | None = None
        self.detached = False
        self.messages_sent = 0

    # --- state ----------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self.close_code is not None or self.failure is not None

    @property
    def queued(self) -> int:
        return self._queued

    def statistics(self) -> SubscriberStatistics:
        return SubscriberStatistics(
            peer=self.peer,
            queued=self._queued,
            lagging=self.lagging_since is not None,
            cursors=tuple((sid, s.cursor) for sid, s in sorted(self.subscriptions.items())),
            messages_sent=self.messages_sent,
            close_code=self.close_code,
            disconnect_reason=self.disconnect_reason,
        )

    def close(self, code: int, reason: str, *, disconnect_reason: str) -> None:
        """Decide to close with ``code`` (the first decision wins) and cancel the connection.

        The WS server sends the close frame once the scope has unwound."""
        if self.close_code is None and self.failure is None:
            self.close_code = code
            self.close_reason = reason
            self.disconnect_reason = disconnect_reason
            if code == CLOSE_SLOW_CONSUMER:
                self.hub._slow_closed += 1
            level = logging.DEBUG if code == CLOSE_GOING_AWAY else logging.INFO
            log.log(level, "closing subscriber %s: %s %s", self.peer, code, reason)
        self.cancel_scope.cancel()

    def fail(self, description: str, *, disconnect_reason: str) -> None:
        """The connection broke: isolate this subscriber; the next publish step reports it."""
        if self.failure is None and self.close_code is None:
            self.failure = description
            self.disconnect_reason = disconnect_reason
            log.info("subscriber %s failed: %s", self.peer, description)
        self.cancel_scope.cancel()

    def mark_client_closed(self) -> None:
        """The peer closed the connection with a close frame (a normal end)."""
        if self.disconnect_reason is None:
            self.disconnect_reason = "client_closed"

    # --- the queue (all synchronous: the Hub's send_nowait) -------------------------

    def _mark(self, key: Subscription | _Message) -> None:
        if key not in self._ready:
            self._ready[key] = None
        if not self._wakeup.is_set():
            self._wakeup.set()

    def send_control(self, message: dict[str, object]) -> None:
        """Queue a pong or error for this connection (never blocks)."""
        self._offer_message(_Message(dumps(message)))

    def _offer_message(self, message: _Message) -> None:
        if self.closing:
            return
        if self._queued + 1 > self.hub.queue_max:
            self._make_room(1)
            if self._queued + 1 > self.hub.queue_max:
                self._start_lagging()
            if self._queued + 1 > self.hub.queue_max:
                self.close(
                    CLOSE_SLOW_CONSUMER,
                    "slow consumer: queue full",
                    disconnect_reason="slow_consumer",
                )
                return
        self._queued += 1
        self._mark(message)

    def _offer_closed(self, sub: Subscription, candles: Sequence[Candle]) -> None:
        if self.closing:
            return
        cursor = sub.cursor
        fresh = [c for c in candles if cursor is None or c.candle_time > cursor]
        if not fresh:
            return
        newest = max(c.candle_time for c in fresh)
        if sub.heal_target is not None:
            # lagging: the store has them; raise the target instead of queueing
            sub.heal_target = max(sub.heal_target, newest)
            self.hub._closed_dropped += len(fresh)
            self._mark(sub)
            return
        added = sum(1 for c in fresh if c.candle_time not in sub.pending)
        if self._queued + added > self.hub.queue_max:
            self._make_room(added)
            if self._queued + added > self.hub.queue_max:
                self._start_lagging()
                sub.heal_target = max(sub.heal_target or newest, newest)
                sub.needs_sync = True
                self.hub._closed_dropped += len(fresh)
                self._mark(sub)
                return
        for c in fresh:
            sub.pending[c.candle_time] = c
        self._queued += added
        self._mark(sub)

    def _offer_forming(self, sub: Subscription, candle: Candle) -> None:
        if self.closing or (sub.cursor is not None and candle.candle_time <= sub.cursor):
            return
        if sub.forming is None:
            if self._queued + 1 > self.hub.queue_max:
                self.hub._forming_dropped += 1  # forming goes first; never worth lagging for
                return
            self._queued += 1
        sub.forming = candle
        self._mark(sub)

    def _make_room(self, needed: int) -> None:
        """Drop queued forming candles (the first thing a full queue gives up)."""
        for sub in self.subscriptions.values():
            if sub.forming is not None:
                sub.forming = None
                self._queued -= 1
                self.hub._forming_dropped += 1
                if self._queued + needed <= self.hub.queue_max:
                    return

    def _start_lagging(self) -> None:
        """Drop every queued closed candle; each subscription heals from the store later."""
        if self.lagging_since is None:
            self.lagging_since = trio.current_time()
            self.lag_scope.deadline = self.lagging_since + self.hub.max_lag_s
            log.info("subscriber %s is lagging; it will heal from the store", self.peer)
        for sub in self.subscriptions.values():
            if sub.pending:
                top = max(sub.pending)
                sub.heal_target = top if sub.heal_target is None else max(sub.heal_target, top)
                sub.needs_sync = True
                self._queued -= len(sub.pending)
                self.hub._closed_dropped += len(sub.pending)
                sub.pending.clear()
                self._mark(sub)

    def _take_pending(self, sub: Subscription) -> list[Candle]:
        taken = [sub.pending[t] for t in sorted(sub.pending)]
        self._queued -= len(sub.pending)
        sub.pending.clear()
        cursor = sub.cursor
        return [c for c in taken if cursor is None or c.candle_time > cursor]

    def _drop_subscription(self, sub: Subscription) -> None:
        sub.active = False
        sub.heal_target = None
        self._queued -= len(sub.pending) + (sub.forming is not None)
        sub.pending.clear()
        sub.forming = None
        self._ready.pop(sub, None)
        self._end_lagging_if_healed()

    def _end_lagging_if_healed(self) -> None:
        if self.lagging_since is not None and all(
            s.heal_target is None for s in self.subscriptions.values() if s.active
        ):
            self.lagging_since = None
            self.lag_scope.deadline = math.inf
            log.info("subscriber %s healed from the store", self.peer)


class _SlowSend(Exception):
    """One send did not complete within send_timeout_s."""


@final
class Hub:
    """The subscriber registry and fan-out (implements ``pipeline.MarketSink``).

    Publishing never blocks and never awaits a socket; each subscriber's publish task
    (:meth:`run_publisher`) does the sending, store reads for catch-up and healing, and the
    slow-consumer policy, inside that subscriber's cancel scope. See the module docstring.
    """

    def __init__(
        self,
        store: CandleReader,
        *,
        series: Sequence[SeriesId],
        queue_max: int,
        send_timeout_s: float,
        catchup_limit: int,
        metrics: Metrics,
        max_lag_s: float | None = None,
    ) -> None:
        if queue_max < 1 or catchup_limit < 1 or send_timeout_s <= 0:
            raise ValueError("queue_max and catchup_limit must be >= 1, send_timeout_s > 0")
        self.store = store
        self.series = {str(s): s for s in series}
        self.queue_max = queue_max
        self.send_timeout_s = send_timeout_s
        self.catchup_limit = catchup_limit
        self.metrics = metrics
        self.max_lag_s = (
            max_lag_s if max_lag_s is not None else DEFAULT_MAX_LAG_FACTOR * send_timeout_s
        )
        self._attached: dict[Subscriber, None] = {}
        self._attached_changed = trio.Event()
        self._index: dict[str, dict[Subscription, None]] = {}
        self._messages_sent = 0
        self._candles_sent = 0
        self._gaps_sent = 0
        self._syncs = 0
        self._forming_dropped = 0
        self._closed_dropped = 0
        self._slow_closed = 0

    # --- registry --------------------------------------------------------------------

    def statistics(self) -> HubStatistics:
        failed = {
            s.subscriber for subs in self._index.values() for s in subs if s.subscriber.detached
        }
        return HubStatistics(
            subscribers=len(self._attached),
            subscriptions=sum(len(s.subscriptions) for s in self._attached),
            lagging_subscribers=sum(1 for s in self._attached if s.lagging_since is not None),
            failed_unreported=len(failed),
            messages_sent=self._messages_sent,
            candles_sent=self._candles_sent,
            gaps_sent=self._gaps_sent,
            store_syncs=self._syncs,
            forming_dropped=self._forming_dropped,
            closed_dropped_for_lag=self._closed_dropped,
            slow_consumers_closed=self._slow_closed,
        )

    def subscribers(self) -> tuple[Subscriber, ...]:
        return tuple(self._attached)

    async def wait_subscribers(self, count: int) -> None:
        """Wait until exactly ``count`` connections are attached (tests, readiness probes)."""
        while len(self._attached) != count:
            await self._attached_changed.wait()
        await trio.lowlevel.checkpoint()

    def _notify_attached(self) -> None:
        self._attached_changed.set()
        self._attached_changed = trio.Event()

    def attach(self, socket: MessageSocket, *, peer: str, max_subscriptions: int) -> Subscriber:
        """Register a new connection. The caller runs :meth:`run_publisher` for it inside
        ``subscriber.cancel_scope`` and calls :meth:`detach` when the connection ends."""
        subscriber = Subscriber(self, socket, peer, max_subscriptions)
        self._attached[subscriber] = None
        self.metrics.subscribers.inc()
        self._notify_attached()
        return subscriber

    def detach(self, subscriber: Subscriber) -> None:
        """Forget a finished connection. A failed one stays in the series index until a
        publish step has reported it (see the module docstring)."""
        if subscriber.detached:
            return
        subscriber.detached = True
        subscriber.cancel_scope.cancel()
        self._attached.pop(subscriber, None)
        self.metrics.subscribers.dec()
        self._notify_attached()
        reason = subscriber.disconnect_reason or "client_closed"
        self.metrics.subscriber_disconnects_total.labels(reason=reason).inc()
        if subscriber.failure is None:
            self._unindex(subscriber)

    def _unindex(self, subscriber: Subscriber) -> None:
        for sub in list(subscriber.subscriptions.values()):
            subscriber._drop_subscription(sub)
            self._remove_from_index(sub)
        subscriber.subscriptions.clear()

    def _remove_from_index(self, sub: Subscription) -> None:
        subs = self._index.get(sub.series_id)
        if subs is not None:
            subs.pop(sub, None)
            if not subs:
                del self._index[sub.series_id]

    def close_all(self, code: int, reason: str, *, disconnect_reason: str) -> None:
        """Close every connected subscriber (server shutdown: 1001)."""
        for subscriber in list(self._attached):
            subscriber.close(code, reason, disconnect_reason=disconnect_reason)

    def subscribe(
        self, subscriber: Subscriber, series: SeriesId, since: int | None, batch: bool
    ) -> None:
        """Register (or replace) a subscription at once and queue its catch-up.

        Raises ClientMessageError (``unknown_series``, ``too_many_subscriptions``)."""
        sid = str(series)
        if sid not in self.series:
            served = ", ".join(sorted(self.series)[:10])
            raise ClientMessageError(
                "unknown_series",
                f"{sid} is not ingested or derived by this daemon; served: {served}",
                sid,
            )
        old = subscriber.subscriptions.get(sid)
        if old is None and len(subscriber.subscriptions) >= subscriber.max_subscriptions:
            raise ClientMessageError(
                "too_many_subscriptions",
                f"at most {subscriber.max_subscriptions} subscriptions per connection;"
                f" unsubscribe from one before subscribing to {sid}",
                sid,
            )
        if subscriber.closing:
            return
        if old is not None:
            subscriber._drop_subscription(old)
            self._remove_from_index(old)
        sub = Subscription(subscriber, series, since, batch)
        subscriber.subscriptions[sid] = sub
        self._index.setdefault(sid, {})[sub] = None
        subscriber._mark(sub)

    def unsubscribe(self, subscriber: Subscriber, series: SeriesId) -> bool:
        """Drop a subscription; False when there was none (not an error)."""
        sub = subscriber.subscriptions.pop(str(series), None)
        if sub is None:
            return False
        subscriber._drop_subscription(sub)
        self._remove_from_index(sub)
        return True

    # --- publishing (MarketSink): synchronous, never blocks ---------------------------

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        if not candles:
            return ()
        return self._fan_out(series_id, lambda s: s.subscriber._offer_closed(s, candles))

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        text = dumps(event.to_wire())
        return self._fan_out(event.series_id, lambda s: s.subscriber._offer_message(_Message(text)))

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        subs = self._index.get(series_id)
        if not subs:
            return
        for sub in list(subs):
            if sub.subscriber.failure is None:
                try:
                    sub.subscriber._offer_forming(sub, candle)
                except Exception:
                    log.exception("queueing a forming candle for %s failed", sub.subscriber.peer)
                    sub.subscriber.close(
                        CLOSE_INTERNAL_ERROR, "internal error", disconnect_reason="internal_error"
                    )

    def _fan_out(self, series_id: str, offer: _Offer) -> list[str]:
        subs = self._index.get(series_id)
        if not subs:
            return []
        failures: list[str] = []
        for sub in list(subs):
            subscriber = sub.subscriber
            if subscriber.failure is not None:
                failures.append(f"subscriber {subscriber.peer}: {subscriber.failure}")
                self._forget_failed(subscriber)
                continue
            try:
                offer(sub)
            except Exception as exc:
                log.exception("queueing for subscriber %s failed", subscriber.peer)
                failures.append(f"subscriber {subscriber.peer}: {type(exc).__name__}: {exc}")
                subscriber.close(
                    CLOSE_INTERNAL_ERROR, "internal error", disconnect_reason="internal_error"
                )
        if len(failures) > MAX_FAILURES_LISTED:
            more = len(failures) - MAX_FAILURES_LISTED
            failures = [*failures[:MAX_FAILURES_LISTED], f"and {more} more subscriber(s)"]
        return failures

    def _forget_failed(self, subscriber: Subscriber) -> None:
        """A failed subscriber has been reported once: take it out of the index."""
        for sub in list(subscriber.subscriptions.values()):
            subscriber._drop_subscription(sub)
            self._remove_from_index(sub)
        subscriber.subscriptions.clear()

    # --- the publish task -------------------------------------------------------------

    async def run_publisher(self, subscriber: Subscriber) -> None:
        """The subscriber's publish task. Runs until its connection is cancelled; a delivery
        failure or a slow socket closes this subscriber only, never raises."""
        try:
            with subscriber.lag_scope:
                await self._publish_loop(subscriber)
            if subscriber.lag_scope.cancelled_caught:
                subscriber.close(
                    CLOSE_SLOW_CONSUMER,
                    f"slow consumer: lagging for more than {self.max_lag_s:g}s",
                    disconnect_reason="slow_consumer",
                )
        except _SlowSend:
            subscriber.close(
                CLOSE_SLOW_CONSUMER,
                f"slow consumer: a send took longer than {self.send_timeout_s:g}s",
                disconnect_reason="slow_consumer",
            )
        except trio_websocket.ConnectionClosed as exc:
            if exc.reason is not None and exc.reason.code in CLIENT_GOODBYE_CODES:
                # the client said goodbye while we were sending: a normal end, not a
                # delivery failure (a strict publish must not fail because a chart closed)
                subscriber.mark_client_closed()
                subscriber.cancel_scope.cancel()
            elif not subscriber.closing:
                subscriber.fail(
                    f"delivery failed: {type(exc).__name__} {exc}".strip(),
                    disconnect_reason="send_failed",
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not subscriber.closing:
                subscriber.fail(
                    f"delivery failed: {type(exc).__name__} {exc}".strip(),
                    disconnect_reason="send_failed",
                )
        except StoreError as exc:
            # the ingest side stops the daemon on a store failure; here only this one ends
            log.error("subscriber %s: store read failed: %s", subscriber.peer, exc)
            subscriber.close(
                CLOSE_INTERNAL_ERROR, "store unavailable", disconnect_reason="internal_error"
            )
        except Exception:
            # a bug must not take the server (and every other subscriber) down with it
            log.exception("subscriber %s: publish task failed", subscriber.peer)
            subscriber.close(
                CLOSE_INTERNAL_ERROR, "internal error", disconnect_reason="internal_error"
            )

    async def _publish_loop(self, subscriber: Subscriber) -> None:
        while True:
            await subscriber._wakeup.wait()
            subscriber._wakeup = trio.Event()
            items = list(subscriber._ready)
            subscriber._ready.clear()
            for item in items:
                if subscriber.closing:
                    return
                if isinstance(item, _Message):
                    subscriber._queued -= 1
                    await self._send(subscriber, item.text)
                elif item.active:
                    await self._flush_series(subscriber, item)

    async def _send(self, subscriber: Subscriber, text: str) -> None:
        with trio.move_on_after(self.send_timeout_s) as scope:
            await subscriber.socket.send_message(text)
        if scope.cancelled_caught:
            raise _SlowSend
        subscriber.messages_sent += 1
        self._messages_sent += 1

    async def _flush_series(self, subscriber: Subscriber, sub: Subscription) -> None:
        carry: list[Candle] = []
        while True:
            if carry or sub.needs_sync or _has_hole(sub):
                await self._sync(subscriber, sub, carry[-1].candle_time if carry else -1)
                if _stale(subscriber, sub):
                    return
            pending = {c.candle_time: c for c in carry}
            pending.update((c.candle_time, c) for c in subscriber._take_pending(sub))
            # a hole before a candle a store read has already covered is the store's own
            # (a gap); one before a newer candle needs another read first
            ready, carry = _split_at_unverified_hole(sub, [pending[t] for t in sorted(pending)])
            await self._send_closed(subscriber, sub, ready)
            if _stale(subscriber, sub):
                return
            if not carry:
                break
        forming = sub.forming
        if forming is not None and sub.active:
            sub.forming = None
            subscriber._queued -= 1
            if sub.cursor is None or forming.candle_time > sub.cursor:
                text = dumps(
                    {
                        "type": "candle_forming",
                        "series_id": sub.series_id,
                        "candle": forming.to_wire(),
                    }
                )
                await self._send(subscriber, text)

    async def _sync(self, subscriber: Subscriber, sub: Subscription, carried_upto: int) -> None:
        """Send from the store what the subscription is missing: its catch-up, a heal after
        lagging, or a hole. Live candles published meanwhile wait in the pending buffer (or
        raise the heal target while lagging); the caller sends them afterwards.

        Sets ``sub.verified_upto``: every candle published before the last read started
        (the pending ones, and ``carried_upto`` the caller holds) was committed before it,
        so a hole below them that the read did not fill is the store's own."""
        self._syncs += 1
        limit = self.catchup_limit
        while True:
            target_before_read = sub.heal_target
            sub.verified_upto = max(carried_upto, max(sub.pending, default=-1))
            if sub.use_tail or sub.cursor is None:
                sub.use_tail = False
                chunk = await self.store.tail(sub.series_id, limit)
                complete = True
                if not chunk and sub.cursor is None:
                    # nothing stored yet: everything committed from now on is live for this
                    # subscriber, so a later hole heals from the very start of the store
                    sub.cursor = EMPTY_STORE_CURSOR
            elif sub.probe_anchor:
                sub.probe_anchor = False
                # read from just below the cursor: a stored candle AT the cursor anchors gaps
                raw = await self.store.since(sub.series_id, sub.cursor - 1, limit + 1)
                complete = len(raw) <= limit
                if raw and raw[0].candle_time == sub.cursor:
                    sub.anchored = True
                    raw = raw[1:]
                chunk = raw[:limit]
            else:
                chunk = await self.store.since(sub.series_id, sub.cursor, limit)
                complete = len(chunk) < limit
            if _stale(subscriber, sub):
                return
            await self._send_closed(subscriber, sub, chunk)
            if _stale(subscriber, sub):
                return
            target = sub.heal_target
            if complete and (
                target is None
                or (sub.cursor is not None and sub.cursor >= target)
                # the store ends below a target that a read started after it was set: a
                # candle that was never committed cannot be healed (defensive; not expected)
                or (not chunk and target == target_before_read)
            ):
                break
        sub.heal_target = None
        sub.needs_sync = False
        subscriber._end_lagging_if_healed()

    async def _send_closed(
        self, subscriber: Subscriber, sub: Subscription, candles: Sequence[Candle]
    ) -> None:
        """Send ``candles`` (ascending) above the cursor, with a ``gap`` at each hole; moves
        the cursor. Batch subscribers get one candles_batch per run of candles."""
        messages: list[str] = []
        run: list[Candle] = []
        tf = sub.tf_seconds
        for candle in candles:
            t = candle.candle_time
            cursor = sub.cursor
            if cursor is not None and t <= cursor:
                continue
            if sub.anchored and cursor is not None and t > cursor + tf:
                self._encode_run(sub, run, messages)
                run = []
                messages.append(
                    dumps(
                        {
                            "type": "gap",
                            "series_id": sub.series_id,
                            "expected_next_time": cursor + tf,
                            "actual_time": t,
                        }
                    )
                )
                self._gaps_sent += 1
                self.metrics.gaps_total.inc()
            run.append(candle)
            sub.cursor = t
            sub.anchored = True
        self._encode_run(sub, run, messages)
        for text in messages:
            await self._send(subscriber, text)

    def _encode_run(self, sub: Subscription, run: list[Candle], out: list[str]) -> None:
        if not run:
            return
        self._candles_sent += len(run)
        if sub.batch:
            for start in range(0, len(run), self.catchup_limit):
                part = run[start : start + self.catchup_limit]
                out.append(
                    dumps(
                        {
                            "type": "candles_batch",
                            "series_id": sub.series_id,
                            "candles": [c.to_wire() for c in part],
                        }
                    )
                )
        else:
            out.extend(
                dumps({"type": "candle_closed", "series_id": sub.series_id, "candle": c.to_wire()})
                for c in run
            )


class _Offer(Protocol):
    def __call__(self, sub: Subscription, /) -> None: ...


def _stale(subscriber: Subscriber, sub: Subscription) -> bool:
    """After an await: was the subscription replaced/dropped, or the connection closed?"""
    return not sub.active or subscriber.closing


def _split_at_unverified_hole(
    sub: Subscription, candles: list[Candle]
) -> tuple[list[Candle], list[Candle]]:
    """``candles`` (ascending) up to the first hole that no store read has covered yet."""
    previous = sub.cursor
    for index, candle in enumerate(candles):
        t = candle.candle_time
        if previous is not None and t <= previous:
            continue
        if previous is not None and t > previous + sub.tf_seconds and t > sub.verified_upto:
            return candles[:index], candles[index:]
        previous = t
    return candles, []


def _has_hole(sub: Subscription) -> bool:
    """Would the buffered candles leave a hole after the cursor? (Healing does not need an
    anchored cursor: ``since`` asks for everything after it; only ``gap`` does.)"""
    if sub.cursor is None or not sub.pending:
        return False
    previous = sub.cursor
    for t in sorted(sub.pending):
        if t <= previous:
            continue
        if t > previous + sub.tf_seconds:
            return True
        previous = t
    return False


__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_POLICY",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOO_BIG",
    "CandleReader",
    "Hub",
    "HubStatistics",
    "MessageSocket",
    "Subscriber",
    "SubscriberStatistics",
    "Subscription",
]
