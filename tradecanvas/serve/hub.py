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

Publishing (``publish_closed``, ``publish_system``, ``publish_forming``) is synchronous and
never awaits a socket. Each message is encoded once per publish and framed once, shared by
every subscriber of the series (:class:`~tradecanvas.serve.encoded.SharedEncodings`). Two
paths, per subscriber:

- **at once** (the fast path): a subscriber whose publish task is parked with an empty
  queue (:attr:`Subscriber.idle`), whose subscription is caught up and gets the candles
  right after its cursor (``subscription.in_step``: no store read, no gap) and whose
  connection takes pre-framed bytes (the WS port's) gets the shared frames written to its
  socket now, without blocking and without waking its task. Nothing is awaited, so a
  minute's closes reach a thousand idle subscribers without a thousand task wake-ups.
- **queued** (everything else: the socket would block, the subscriber is behind or busy, the
  HTTP port's connections, system events): the work is offered to its own bounded
  :class:`SubscriberQueue` (the Hub's ``send_nowait``), which wakes its publish task
  (``tradecanvas.serve.publisher``): it carries out the queue's drain plan — store reads
  for catch-up and healing only, then the messages — each write within ``send_timeout_s``;
  a lagging subscriber's publish task runs under the queue's lag deadline.

Within :meth:`Hub.corked` (the ingest's publish of one committed batch) the frames a
subscriber gets at once are held and go to its socket in one write when the block ends:
one system call and one wake-up of the client for the three series a chart follows, not
three (issue 14's latency). What that write leaves unsent, or all of it when the socket
takes nothing now, is the subscriber's :attr:`Subscriber.unsent`, which its publish task
writes before anything else.

A message goes at once only when nothing for that subscriber is queued ahead of it, so both
paths keep each subscription's order (closed candles in time order, a forming candle after
the closes before it, system events in their place). The delivery of each published batch
is timed (``ops.metrics.DeliveryTimer``), and the deepest any queue has been lately is on
``tradecanvas_subscriber_queue_high_water`` (``serve/high_water.py``).

The forming snapshot
--------------------
The Hub remembers each series' newest forming candle (the last ``publish_forming``, one per
series it serves), and forgets it when a close at or above its time is published. A new or
replaced subscription is offered it at once, through its queue like any forming candle: it
goes out once the catch-up is sent, only above the cursor and after every close owed before
it (``drain``), or not at all when a newer one replaced it first. So a chart shows the bar in
progress as soon as it is live, not at the next trade. A remembered bar whose close was stored
but not published here (an edge passes over a series nobody follows; a strict publish that
failed) is never sent: the catch-up reads that close first, and the cursor is past it.

Failures and ``best_effort``
----------------------------
A client that goes away — its socket broke under a send, or the peer vanished without a close
handshake — is cancelled and closed by its own task, logged once at INFO (``subscriber …
went away: …``) and counted in ``tradecanvas_subscriber_disconnects_total`` (``send_failed``,
``connection_lost``); its queue and buffers are freed at :meth:`Hub.detach`. That is a client
leaving, as a close frame is, not a failed delivery: no publish reports it, so it neither
counts as a failed publish step nor fails a strict publish (a chart's tab closing, a phone
changing network, must not turn an HTTP write into a 503). What a publish reports is the
daemon's own failure: an exception raised while queueing for one subscriber, which isolates
that subscriber (close 1011); one description per such subscriber, at most
``MAX_FAILURES_LISTED`` and a count of the rest. The caller (``IngestPipeline.publish``)
decides between best effort and ``PublishError``. A subscriber is closed with 4008 when the
queue decides so, or when one send does not complete within ``send_timeout_s``. Nobody else
notices: other subscribers and publishers never wait for it.

Errors: :class:`~tradecanvas.errors.ClientMessageError` (with a protocol ``code``) from
:meth:`Hub.subscribe`. Nothing else is raised to publishers.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Final, final

import attrs
import trio

from tradecanvas.errors import ClientMessageError
from tradecanvas.model import Candle, SeriesId
from tradecanvas.ops.metrics import DeliveryBatch, Metrics
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.encoded import Published, SharedEncodings
from tradecanvas.serve.high_water import RecentHighWater
from tradecanvas.serve.publisher import CATCHUPS_AT_ONCE, CandleReader, Publisher
from tradecanvas.serve.served import describe_served
from tradecanvas.serve.subscriber import FrameWriter, MessageSocket, Subscriber, TransportClosed
from tradecanvas.serve.subscriber_queue import CloseDecision, SubscriberQueue
from tradecanvas.serve.subscription import forming_in_step, in_step, sent_in_step
from tradecanvas.serve.ws_protocol import CLOSE_INTERNAL_ERROR
from tradecanvas.wire.json import dumps

log = logging.getLogger(__name__)

# a lagging subscriber gets this many send timeouts' worth of time to heal before 4008
DEFAULT_MAX_LAG_FACTOR: Final = 3.0
# failure descriptions returned by one publish call at most (the rest are counted)
MAX_FAILURES_LISTED: Final = 20


@attrs.frozen
class HubStatistics:
    subscribers: int


@final
class Hub:
    """The subscriber registry and fan-out (implements ``pipeline.MarketSink``).

    Publishing never blocks and never awaits a socket: it writes at once to idle, caught-up
    subscribers whose socket takes it, and queues for the rest; each subscriber's publish
    task (:meth:`run_publisher`) does the store reads and the queued sends inside that
    subscriber's cancel scope. See the module docstring.
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
        catchups_at_once: int = CATCHUPS_AT_ONCE,
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
        self.encodings = SharedEncodings(catchup_limit)
        self._publisher = Publisher(
            store,
            self.encodings,
            send_timeout_s=send_timeout_s,
            metrics=metrics,
            catchups_at_once=catchups_at_once,
        )
        self.run_publisher = self._publisher.run
        self._attached: dict[Subscriber, None] = {}
        self._attached_changed = trio.Event()
        # series id → the subscribers holding a subscription to it
        self._index: dict[str, dict[Subscriber, None]] = {}
        # series id → its newest forming candle, the snapshot a new subscription gets
        self._forming: dict[str, Candle] = {}
        # within corked(): the frames each subscriber got at once, not yet written
        self._held: dict[Subscriber, list[bytes]] | None = None
        self._high_water = RecentHighWater()  # the queues' peaks of the last minute or two
        metrics.subscriber_queue_high_water.set_function(self._queue_high_water)

    def _queue_high_water(self) -> float:
        now = trio.current_time()
        for subscriber in self._attached:
            self._high_water.note(subscriber.queue.take_high_water(), now)
        return float(self._high_water.peak(now))

    # --- registry --------------------------------------------------------------------

    def statistics(self) -> HubStatistics:
        return HubStatistics(subscribers=len(self._attached))

    def subscribers(self) -> tuple[Subscriber, ...]:
        """The attached connections, oldest first."""
        return tuple(self._attached)

    def follows(self, series_id: str) -> bool:  # bus/feed.py decodes only what one follows
        return series_id in self._index  # any subscriber holds a subscription to it

    async def wait_subscribers(self, count: int) -> None:
        """Wait until exactly ``count`` connections are attached (tests, readiness probes)."""
        while len(self._attached) != count:
            await self._attached_changed.wait()
        await trio.lowlevel.checkpoint()

    def _notify_attached(self) -> None:
        self._attached_changed.set()
        self._attached_changed = trio.Event()

    def attach(
        self,
        socket: MessageSocket,
        *,
        peer: str,
        max_subscriptions: int,
        frames: FrameWriter | None = None,
    ) -> Subscriber:
        """Register a new connection (``frames``: its pre-framed writer, if it has one).
        The caller runs :meth:`run_publisher` for it inside ``subscriber.cancel_scope`` and
        calls :meth:`detach` when the connection ends."""
        subscriber = Subscriber(
            socket,
            peer,
            max_subscriptions,
            queue_max=self.queue_max,
            max_lag_s=self.max_lag_s,
            catchup_limit=self.catchup_limit,
            frames=frames,
        )
        self._attached[subscriber] = None
        self.metrics.subscribers.inc()
        self._notify_attached()
        return subscriber

    def detach(self, subscriber: Subscriber) -> None:
        """Forget a finished connection (a client gone is no publish's failure: see the
        module docstring)."""
        if subscriber.detached:
            return
        subscriber.detached = True
        subscriber.cancel_scope.cancel()
        self._attached.pop(subscriber, None)
        self.metrics.subscribers.dec()
        self._notify_attached()
        reason = subscriber.disconnect_reason or "client_closed"
        self.metrics.subscriber_disconnects_total.labels(reason=reason).inc()
        self.metrics.delivery.abandon(subscriber.take_owed())
        # its peak stays on the gauge for its window (a 4008 with a full queue, say)
        self._high_water.note(subscriber.queue.take_high_water(), trio.current_time())
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
            raise ClientMessageError(
                "unknown_series",
                f"{sid} is not ingested or derived by this daemon;"
                f" {describe_served(sid, self.series)}",
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
        forming = self._forming.get(sid)
        if forming is not None:  # the bar in progress, after the catch-up if above it
            subscriber.queue.offer_forming(sid, forming)

    def unsubscribe(self, subscriber: Subscriber, series: SeriesId) -> bool:
        """Drop a subscription; False when there was none (not an error)."""
        sid = str(series)
        if not subscriber.queue.unsubscribe(sid):
            return False
        self._remove_from_index(sid, subscriber)
        return True

    # --- publishing (MarketSink): synchronous, never blocks ---------------------------

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        """Publishes within the block hold what they write at once; at its end each
        subscriber's held frames go out in one write (the rest, if the socket does not take
        it all now, is written by its publish task before anything else). Not nested: an
        inner block adds to the outer one's writes."""
        if self._held is not None:
            yield
            return
        held: dict[Subscriber, list[bytes]] = {}
        self._held = held
        try:
            yield
        finally:
            self._held = None
            if held:
                self._write_held(held)

    def _write_held(self, held: dict[Subscriber, list[bytes]]) -> None:
        batch = self.metrics.delivery.current
        sent = False
        for subscriber, pieces in held.items():
            frames = subscriber.frames
            assert frames is not None  # only a FrameWriter's subscriber gets frames at once
            data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
            try:
                complete = frames.write_nowait(data)
            except (
                trio.WouldBlock,
                TransportClosed,
                trio.BrokenResourceError,
                trio.ClosedResourceError,
            ):
                # committed all the same (the cursors moved): its publish task writes it,
                # or meets the connection's end and handles it as it would any write's
                subscriber.unsent = data
                complete = False
            if complete:
                sent = True
            else:
                subscriber.wake()
                if batch is not None and not subscriber.detached:
                    subscriber.owe(batch)
        if sent and batch is not None and batch.last_sent is None:
            self.metrics.delivery.sent_at_once(batch, trio.current_time())

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        if not candles:
            return ()
        forming = self._forming.get(series_id)
        if forming is not None and max(c.candle_time for c in candles) >= forming.candle_time:
            del self._forming[series_id]  # its bar closed (or a later one did): stale now
        subscribers = self._index.get(series_id)
        if not subscribers:
            return []
        published = self.encodings.published(series_id, candles)
        now = trio.current_time()
        failures = self._fan_out(
            subscribers,
            lambda q: q.offer_closed(series_id, candles, now),
            lambda s: self._closed_at_once(s, published),
        )
        return _listed(failures)

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        sid, event_id = event.series_id, event.event_id
        subscribers = self._index.get(sid)
        if not subscribers:
            return []
        text = dumps(event.to_wire())
        now = trio.current_time()
        failures = self._fan_out(subscribers, lambda q: q.offer_event(sid, event_id, text, now))
        return _listed(failures)

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        if series_id in self.series:
            self._forming[series_id] = candle
        subscribers = self._index.get(series_id)
        if not subscribers:
            return
        frame: bytes | None = None
        for subscriber in list(subscribers):
            if subscriber.failure is None:
                try:
                    if subscriber.idle and subscriber.frames is not None:
                        sub = subscriber.queue.subscriptions.get(series_id)
                        if sub is not None and forming_in_step(sub, candle):
                            if frame is None:
                                frame = self.encodings.forming(series_id, candle).frame
                            if self._write_at_once(subscriber, subscriber.frames, frame):
                                continue
                    subscriber.queue.offer_forming(series_id, candle)
                except Exception:
                    log.exception("queueing a forming candle for %s failed", subscriber.peer)
                    subscriber.close(
                        CLOSE_INTERNAL_ERROR, "internal error", disconnect_reason="internal_error"
                    )

    def _closed_at_once(self, subscriber: Subscriber, published: Published) -> bool:
        """Write ``published`` to ``subscriber`` now if it is idle and caught up and its
        socket takes it; False: queue it instead (nothing was written)."""
        frames = subscriber.frames
        if frames is None or not subscriber.idle:
            return False
        sub = subscriber.queue.subscriptions.get(published.series_id)
        if sub is None or not in_step(sub, published.candles):
            return False
        data = published.frames(sub.batch, self.catchup_limit)
        if data is None or not self._write_at_once(subscriber, frames, data):
            return False
        sent_in_step(sub, published.candles)
        return True

    def _write_at_once(self, subscriber: Subscriber, frames: FrameWriter, data: bytes) -> bool:
        """True when ``data`` is committed to the socket (all written, or the rest left for
        the publish task to flush, which is woken and owes the batch being timed), or held
        for the end of :meth:`corked`."""
        if self._held is not None:
            self._held.setdefault(subscriber, []).append(data)
            return True
        try:
            complete = frames.write_nowait(data)
        except trio.WouldBlock:
            return False
        except (TransportClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            # queued instead: the publish task meets the same end and handles it
            return False
        batch = self.metrics.delivery.current
        if not complete:
            subscriber.wake()
            if batch is not None:
                subscriber.owe(batch)
        elif batch is not None and batch.last_sent is None:
            # the publish's end times it (DeliveryTimer.publishing): one clock read a batch
            self.metrics.delivery.sent_at_once(batch, trio.current_time())
        return True

    def _fan_out(
        self,
        subscribers: dict[Subscriber, None],
        offer: Callable[[SubscriberQueue], CloseDecision | None],
        at_once: Callable[[Subscriber], bool] | None = None,
    ) -> list[str]:
        failures: list[str] = []
        batch: DeliveryBatch | None = self.metrics.delivery.current
        for subscriber in list(subscribers):
            if subscriber.failure is not None:
                self._unindex(subscriber)  # gone (logged, counted): no failure of this publish
                continue
            try:
                if at_once is not None and at_once(subscriber):
                    continue
                decision = offer(subscriber.queue)
                if batch is not None and subscriber.woken:
                    subscriber.owe(batch)
            except Exception as exc:
                log.exception("queueing for subscriber %s failed", subscriber.peer)
                failures.append(f"subscriber {subscriber.peer}: {type(exc).__name__}: {exc}")
                subscriber.close(
                    CLOSE_INTERNAL_ERROR, "internal error", disconnect_reason="internal_error"
                )
                continue
            if decision is not None:
                subscriber.close_for(decision)
        return failures


def _listed(failures: list[str]) -> list[str]:
    """At most ``MAX_FAILURES_LISTED`` of a publish's failures, and a count of the rest."""
    if len(failures) <= MAX_FAILURES_LISTED:
        return failures
    more = len(failures) - MAX_FAILURES_LISTED
    return [*failures[:MAX_FAILURES_LISTED], f"and {more} more subscriber(s)"]


__all__ = [
    "MAX_FAILURES_LISTED",
    "CandleReader",
    "FrameWriter",
    "Hub",
    "HubStatistics",
    "MessageSocket",
    "Subscriber",
    "TransportClosed",
]
