"""Hub: fan-out of closed, forming and system messages to /ws/market subscribers (DESIGN §3, §6).

The trio shell around :mod:`tradecanvas.serve.subscriber_queue`, whose docstring holds the
queue rules: bounds, coalescing, cursors, catch-up, healing and the slow-consumer policy.

Ownership and tasks
-------------------
The Hub owns the one subscriber registry: which connections are attached, and which of them
subscribe to each series. It owns no task and no nursery. Each connection's session
(``tradecanvas.serve.ws_session``, whichever port carries it) owns that connection's lifetime:
it calls :meth:`Hub.attach`, runs :meth:`Hub.run_publisher` — the connection's one **publish
task** — next to its reader inside the :attr:`Subscriber.cancel_scope`, and calls
:meth:`Hub.detach` at the end; :meth:`Hub.close_all` (1001) closes them all at shutdown.

Publishing (``publish_closed``, ``publish_system``, ``publish_forming``) is synchronous: it
only offers work to each subscriber's own bounded :class:`SubscriberQueue` (the Hub's
``send_nowait``), which wakes its publish task; it never awaits a socket. Only the publish
task touches the socket: it carries out the queue's drain plan — store reads, then the
messages encoded and sent, each send within ``send_timeout_s``. A lagging subscriber's
publish task runs under the queue's lag deadline.

Failures and ``best_effort``
----------------------------
A subscriber whose delivery fails — its socket broke under a send, or the peer vanished without
a close handshake — is cancelled and closed by its own task. A publish step that would have
delivered to it reports it (one description per such subscriber, from the next closed/system
publish of one of its series) and then forgets it; an exception raised while queueing for one
subscriber isolates that subscriber (close 1011) and is reported the same way. The caller
(``IngestPipeline.publish``) decides between best effort and ``PublishError``. A subscriber
is closed with 4008 when the queue decides so, or when one send does not complete within
``send_timeout_s``. Nobody else notices: other subscribers and publishers never wait for it.

Errors: :class:`~tradecanvas.errors.ClientMessageError` (with a protocol ``code``) from
:meth:`Hub.subscribe`. Nothing else is raised to publishers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Final, Protocol, final

import attrs
import trio

from tradecanvas.errors import ClientMessageError, StoreError
from tradecanvas.model import Candle, SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.outgoing import (
    Answer,
    EventsRead,
    Gap,
    Outgoing,
    Plan,
    ReadEvents,
    ReadStore,
    StoredEventText,
    encode,
)
from tradecanvas.serve.subscriber import MessageSocket, Subscriber, TransportClosed
from tradecanvas.serve.subscriber_queue import CloseDecision, SubscriberQueue
from tradecanvas.serve.ws_protocol import (
    CLIENT_GOODBYE_CODES,
    CLOSE_INTERNAL_ERROR,
    CLOSE_SLOW_CONSUMER,
)
from tradecanvas.store.types import StoredEvent
from tradecanvas.wire.json import dumps

log = logging.getLogger(__name__)

# a lagging subscriber gets this many send timeouts' worth of time to heal before 4008
DEFAULT_MAX_LAG_FACTOR: Final = 3.0
# failure descriptions returned by one publish call at most (the rest are summarised)
MAX_FAILURES_LISTED: Final = 20


class CandleReader(Protocol):
    """The reads the Hub makes (``CandleStore`` has them): ascending candles and events."""

    async def tail(self, series_id: str, limit: int) -> list[Candle]: ...

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]: ...

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = ...
    ) -> list[StoredEvent]: ...

    async def events_pruned_upto(self) -> int: ...


@attrs.frozen
class HubStatistics:
    subscribers: int


class _SlowSend(Exception):
    """One send did not complete within send_timeout_s."""


@final
class Hub:
    """The subscriber registry and fan-out (implements ``pipeline.MarketSink``).

    Publishing never blocks and never awaits a socket; each subscriber's publish task
    (:meth:`run_publisher`) does the store reads and the sending inside that subscriber's
    cancel scope. See the module docstring.
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
        # series id → the subscribers holding a subscription to it (failed ones until reported)
        self._index: dict[str, dict[Subscriber, None]] = {}

    # --- registry --------------------------------------------------------------------

    def statistics(self) -> HubStatistics:
        return HubStatistics(subscribers=len(self._attached))

    def subscribers(self) -> tuple[Subscriber, ...]:
        """The attached connections, oldest first."""
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
        subscriber = Subscriber(
            socket,
            peer,
            max_subscriptions,
            queue_max=self.queue_max,
            max_lag_s=self.max_lag_s,
            catchup_limit=self.catchup_limit,
        )
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
        for sid in subscriber.queue.subscriptions:
            self._remove_from_index(sid, subscriber)
        subscriber.queue.drop_all()

    def _remove_from_index(self, series_id: str, subscriber: Subscriber) -> None:
        subscribers = self._index.get(series_id)
        if subscribers is not None:
            subscribers.pop(subscriber, None)
            if not subscribers:
                del self._index[series_id]

    def close_all(self, code: int, reason: str, *, disconnect_reason: str) -> None:
        """Close every attached subscriber (server shutdown: 1001)."""
        for subscriber in list(self._attached):
            subscriber.close(code, reason, disconnect_reason=disconnect_reason)

    def subscribe(
        self,
        subscriber: Subscriber,
        series: SeriesId,
        since: int | None,
        batch: bool,
        *,
        events_after: int | None = None,
    ) -> None:
        """Register (or replace) a subscription at once and queue its catch-up (and, with
        ``events_after``, the stored events after that cursor first).

        Raises ClientMessageError (``unknown_series``, ``too_many_subscriptions``)."""
        sid = str(series)
        if sid not in self.series:
            served = ", ".join(sorted(self.series)[:10])
            raise ClientMessageError(
                "unknown_series",
                f"{sid} is not ingested or derived by this daemon; served: {served}",
                sid,
            )
        subscriptions = subscriber.queue.subscriptions
        if sid not in subscriptions and len(subscriptions) >= subscriber.max_subscriptions:
            raise ClientMessageError(
                "too_many_subscriptions",
                f"at most {subscriber.max_subscriptions} subscriptions per connection;"
                f" unsubscribe from one before subscribing to {sid}",
                sid,
            )
        if subscriber.closing:
            return
        # a replacement goes to the end of the series' fan-out order, like a new one
        self._remove_from_index(sid, subscriber)
        subscriber.queue.subscribe(sid, series.timeframe.seconds, since, batch, events_after)
        self._index.setdefault(sid, {})[subscriber] = None

    def unsubscribe(self, subscriber: Subscriber, series: SeriesId) -> bool:
        """Drop a subscription; False when there was none (not an error)."""
        sid = str(series)
        if not subscriber.queue.unsubscribe(sid):
            return False
        self._remove_from_index(sid, subscriber)
        return True

    # --- publishing (MarketSink): synchronous, never blocks ---------------------------

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        if not candles:
            return ()
        now = trio.current_time()
        return self._fan_out(series_id, lambda q: q.offer_closed(series_id, candles, now))

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        text = dumps(event.to_wire())
        now = trio.current_time()
        sid, event_id = event.series_id, event.event_id
        return self._fan_out(sid, lambda q: q.offer_event(sid, event_id, text, now))

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        subscribers = self._index.get(series_id)
        if not subscribers:
            return
        for subscriber in list(subscribers):
            if subscriber.failure is None:
                try:
                    subscriber.queue.offer_forming(series_id, candle)
                except Exception:
                    log.exception("queueing a forming candle for %s failed", subscriber.peer)
                    subscriber.close(
                        CLOSE_INTERNAL_ERROR, "internal error", disconnect_reason="internal_error"
                    )

    def _fan_out(
        self, series_id: str, offer: Callable[[SubscriberQueue], CloseDecision | None]
    ) -> list[str]:
        subscribers = self._index.get(series_id)
        if not subscribers:
            return []
        failures: list[str] = []
        for subscriber in list(subscribers):
            if subscriber.failure is not None:
                failures.append(f"subscriber {subscriber.peer}: {subscriber.failure}")
                self._unindex(subscriber)  # reported once: forget it
                continue
            try:
                decision = offer(subscriber.queue)
            except Exception as exc:
                log.exception("queueing for subscriber %s failed", subscriber.peer)
                failures.append(f"subscriber {subscriber.peer}: {type(exc).__name__}: {exc}")
                subscriber.close(
                    CLOSE_INTERNAL_ERROR, "internal error", disconnect_reason="internal_error"
                )
                continue
            if decision is not None:
                subscriber.close_for(decision)
        if len(failures) > MAX_FAILURES_LISTED:
            more = len(failures) - MAX_FAILURES_LISTED
            failures = [*failures[:MAX_FAILURES_LISTED], f"and {more} more subscriber(s)"]
        return failures

    # --- the publish task -------------------------------------------------------------

    async def run_publisher(self, subscriber: Subscriber) -> None:
        """The subscriber's publish task. Runs until its connection is cancelled; a delivery
        failure or a slow socket closes this subscriber only, never raises."""
        try:
            with subscriber.lag_scope:
                await self._publish_loop(subscriber)
            if subscriber.lag_scope.cancelled_caught:
                subscriber.close_for(subscriber.queue.lagged_out())
        except _SlowSend:
            subscriber.close(
                CLOSE_SLOW_CONSUMER,
                f"slow consumer: a send took longer than {self.send_timeout_s:g}s",
                disconnect_reason="slow_consumer",
            )
        except TransportClosed as exc:
            if exc.code in CLIENT_GOODBYE_CODES:
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
            await subscriber.wait_ready()
            await self._carry_out(subscriber, subscriber.queue.drain())

    async def _carry_out(self, subscriber: Subscriber, plan: Plan) -> None:
        """Run a drain plan: answer its store reads, encode and send its messages."""
        answer: Answer = None
        try:
            while True:
                try:
                    action = plan.send(answer)
                except StopIteration:
                    return
                if isinstance(action, ReadStore):
                    answer = await self._read(action)
                elif isinstance(action, ReadEvents):
                    answer = await self._read_events(action)
                else:
                    answer = None
                    for text in self._encode(action.messages):
                        await self._send(subscriber, text)
        finally:
            plan.close()

    async def _read_events(self, read: ReadEvents) -> EventsRead:
        # the prune mark first: an event pruned after it was read is still in the read
        pruned_upto = await self.store.events_pruned_upto()
        stored = await self.store.events_after(read.after, [read.series_id], read.limit)
        return EventsRead(
            tuple(
                StoredEventText(s.event_id, dumps(SystemEvent.from_stored(s).to_wire()))
                for s in stored
            ),
            pruned_upto,
        )

    async def _read(self, read: ReadStore) -> list[Candle]:
        if read.since is None:
            return await self.store.tail(read.series_id, read.limit)
        return await self.store.since(read.series_id, read.since, read.limit)

    def _encode(self, messages: Sequence[Outgoing]) -> list[str]:
        """The wire texts of ``messages``, in order (counting the gaps as they go out)."""
        texts: list[str] = []
        for message in messages:
            if isinstance(message, Gap):
                self.metrics.gaps_total.inc()
            texts.extend(encode(message, self.catchup_limit))
        return texts

    async def _send(self, subscriber: Subscriber, text: str) -> None:
        with trio.move_on_after(self.send_timeout_s) as scope:
            await subscriber.socket.send_message(text)
        if scope.cancelled_caught:
            raise _SlowSend


__all__ = [
    "CandleReader",
    "Hub",
    "HubStatistics",
    "MessageSocket",
    "Subscriber",
    "TransportClosed",
]
