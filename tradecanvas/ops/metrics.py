"""Prometheus metrics (DESIGN §5), one registry per daemon so tests stay independent.

Besides the metrics themselves, :class:`DeliveryTimer` keeps the bookkeeping behind
``tradecanvas_delivery_latency_seconds``: which published batches some subscriber still owes
a send (docs/operations.md, "Metrics").
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Final, NamedTuple, final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeHistogramMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# the *_created series only double the exposition; nothing of ours reads them
disable_created_metrics()  # type: ignore[no-untyped-call]

PUBLISH_PATHS: Final = ("legacy", "pipeline", "http")
# the causes of serve.subscriber_queue.SLOW_CONSUMER_CAUSES (listed here like the reconnect
# reasons below; a test checks they are the same)
SLOW_CONSUMER_CAUSES: Final = ("stalled", "send_timeout", "lagging", "queue_full")
# serve.ws_protocol.REFUSAL_REASONS, likewise
# every disconnect_reason the serve package passes (a test reads them from its source), and
# the Hub's default client_closed: pre-initialised, so the first one counts in increase()
DISCONNECT_REASONS: Final = (
    "client_closed",
    "slow_consumer",
    "rate_limited",
    "message_too_big",
    "connection_lost",
    "send_failed",
    "internal_error",
    "shutdown",
)
WS_REFUSAL_REASONS: Final = ("not_found", "origin", "shutdown", "max_connections")
# the per-subscriber snapshots on /metrics (SubscriberStatistics): messages queued, bytes
# unacknowledged (the budget is serve.in_flight.IN_FLIGHT_MAX_BYTES), seconds behind
QUEUE_DEPTH_BUCKETS: Final = (0, 1, 4, 16, 64, 256, 1024, 4096, 16384)
IN_FLIGHT_BUCKETS: Final = (0, 1024, 4096, 16384, 65536, 131072, 262144, 1048576)
BEHIND_BUCKETS: Final = (0, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
# the reconnect reasons of upstream.plan.RECONNECT_REASONS (ops comes first in the import
# order, so they are listed here, and a test checks they are the same)
RECONNECT_REASONS: Final = ("rotation", "drop", "stale", "server_shutdown", "error")
# frame received → committed → queued: milliseconds on a healthy box, seconds when REST
# has to repair a hole first
LATENCY_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


# frame received → the last subscriber's send of its batch: tens of milliseconds in a
# minute-boundary burst; seconds only for a subscriber that has to heal from the store
DELIVERY_BUCKETS: Final = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
)


@final
class DeliveryBatch:
    """One published batch on its way to subscribers: when its newest frame was received,
    how many subscribers still owe its send, when the last one that did finished."""

    __slots__ = ("last_sent", "owed", "publishing", "received_at")

    def __init__(self, received_at: float) -> None:
        self.received_at = received_at
        self.owed = 0
        self.publishing = True
        self.last_sent: float | None = None


@final
class DeliveryTimer:
    """Times each published batch from the receipt of its newest frame to the send by its
    last subscriber, into ``tradecanvas_delivery_latency_seconds``.

    The ingest side brackets a batch's publish with :meth:`publishing`; meanwhile the Hub
    notes each subscriber the batch reached: written at once (:meth:`sent_at_once`), or
    queued — that subscriber then owes it (``DeliveryBatch.owed``) until its publish task
    :meth:`settle` s it after the drain that sent it, or :meth:`abandon` s it when the
    subscriber ended first (a closed subscriber does not hold the figure up). A batch that
    reached no subscriber is not observed. Times are the caller's clock (trio's).
    """

    __slots__ = ("_histogram", "current")

    def __init__(self, histogram: Histogram) -> None:
        self._histogram = histogram
        # the batch being published right now (publishing is synchronous)
        self.current: DeliveryBatch | None = None

    @contextmanager
    def publishing(self, received_at: float | None, clock: Callable[[], float]) -> Iterator[None]:
        """Bracket one batch's publish; ``received_at``: its newest frame's receipt (None:
        not from a frame, not timed)."""
        if received_at is None:
            yield
            return
        batch = DeliveryBatch(received_at)
        self.current = batch
        try:
            yield
        finally:
            self.current = None
            batch.publishing = False
            if batch.owed == 0 and batch.last_sent is not None:
                self._histogram.observe(max(batch.last_sent, clock()) - batch.received_at)

    @staticmethod
    def sent_at_once(batch: DeliveryBatch, now: float) -> None:
        batch.last_sent = now

    def settle(self, batches: Iterable[DeliveryBatch], now: float) -> None:
        """A subscriber sent what it owed of ``batches``."""
        for batch in batches:
            batch.owed -= 1
            batch.last_sent = now
            if batch.owed == 0 and not batch.publishing:
                self._histogram.observe(now - batch.received_at)

    def abandon(self, batches: Iterable[DeliveryBatch]) -> None:
        """A subscriber ended before sending what it owed of ``batches``."""
        for batch in batches:
            batch.owed -= 1
            if batch.owed == 0 and not batch.publishing and batch.last_sent is not None:
                self._histogram.observe(batch.last_sent - batch.received_at)


class SubscriberSample(NamedTuple):
    """One connected subscriber at a scrape: messages in its queue, whether it is lagging
    (healing from the store), bytes written to it and not yet acknowledged, and seconds
    behind (the longer of its lag and the age of its oldest unacknowledged byte)."""

    queued: int
    lagging: bool
    in_flight_bytes: int
    behind_s: float


def _gauge_histogram(
    name: str, doc: str, values: Sequence[float], bounds: Sequence[float]
) -> GaugeHistogramMetricFamily:
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    buckets: list[tuple[str, float]] = []
    total = 0
    for bound, count in zip([*bounds, math.inf], counts, strict=True):
        total += count
        label = "+Inf" if bound == math.inf else str(int(bound) if bound == int(bound) else bound)
        buckets.append((label, float(total)))
    return GaugeHistogramMetricFamily(name, doc, buckets=buckets, gsum_value=float(sum(values)))


@final
class SubscriberStatistics(Collector):
    """The connected subscribers' queues and lag, aggregated at each scrape from
    :attr:`source` (set by whoever owns the subscribers: the /ws/market endpoint):
    gauge histograms over the subscribers (bucket ``le`` = how many are at or below it now)
    and the number lagging. Nothing while no source is set."""

    def __init__(self) -> None:
        self.source: Callable[[], Iterable[SubscriberSample]] | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        if self.source is None:
            return
        samples = list(self.source())
        yield _gauge_histogram(
            "tradecanvas_subscriber_queue_depth",
            "Connected subscribers by messages in their queue now",
            [s.queued for s in samples],
            QUEUE_DEPTH_BUCKETS,
        )
        yield _gauge_histogram(
            "tradecanvas_subscriber_in_flight_bytes",
            "Connected subscribers by bytes written to them and not yet acknowledged",
            [s.in_flight_bytes for s in samples],
            IN_FLIGHT_BUCKETS,
        )
        yield _gauge_histogram(
            "tradecanvas_subscriber_behind_seconds",
            "Connected subscribers by seconds behind: the longer of their lag (healing from"
            " the store) and the age of their oldest unacknowledged byte",
            [s.behind_s for s in samples],
            BEHIND_BUCKETS,
        )
        lagging = GaugeMetricFamily(
            "tradecanvas_subscribers_lagging",
            "Connected subscribers lagging: their queue overflowed, they heal from the store",
        )
        lagging.add_metric([], float(sum(1 for s in samples if s.lagging)))
        yield lagging


@final
class Metrics:
    """Owns a CollectorRegistry and every tradecanvas metric. Components take one."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # process_start_time_seconds (the restart alert), CPU, memory, open files
        ProcessCollector(registry=r)
        # 1 for the role this process runs (the daemon sets it; the alerts join on it)
        self.role_info = Gauge(
            "tradecanvas_role_info",
            "1 for this process's role: all, ingest or edge",
            ["role"],
            registry=r,
        )
        # 1 for the release running and the store schema it writes (the daemon sets it)
        self.build_info = Gauge(
            "tradecanvas_build_info",
            "1 for this process's release (version) and its store's schema version (schema)",
            ["version", "schema"],
            registry=r,
        )
        self.publish_total = Counter(
            "tradecanvas_publish",
            "Publish calls, by path (legacy loop, pipeline, HTTP strict)",
            ["path"],
            registry=r,
        )
        for path in PUBLISH_PATHS:
            self.publish_total.labels(path=path)
        self.publish_failed_steps_total = Counter(
            "tradecanvas_publish_failed_steps",
            "Publish steps that had a failing delivery (isolated)",
            ["path"],
            registry=r,
        )
        self.candles_committed_total = Counter(
            "tradecanvas_candles_committed",
            "Candles newly stored or revised (base and derived)",
            registry=r,
        )
        self.subscribers = Gauge(
            "tradecanvas_subscribers", "Connected /ws/market subscribers", registry=r
        )
        self.subscriber_disconnects_total = Counter(
            "tradecanvas_subscriber_disconnects",
            "Subscriber disconnects by reason",
            ["reason"],
            registry=r,
        )
        for reason in DISCONNECT_REASONS:
            self.subscriber_disconnects_total.labels(reason=reason)
        self.slow_consumer_closes_total = Counter(
            "tradecanvas_slow_consumer_closes",
            "Subscribers closed with 4008, by cause: stalled, send_timeout, lagging, queue_full",
            ["cause"],
            registry=r,
        )
        for cause in SLOW_CONSUMER_CAUSES:
            self.slow_consumer_closes_total.labels(cause=cause)
        self.ws_refusals_total = Counter(
            "tradecanvas_ws_refusals",
            "/ws/market upgrades refused, by reason: not_found (404), origin (403),"
            " shutdown (503), max_connections (503)",
            ["reason"],
            registry=r,
        )
        for reason in WS_REFUSAL_REASONS:
            self.ws_refusals_total.labels(reason=reason)
        self.ws_handshakes_pending = Gauge(
            "tradecanvas_ws_handshakes_pending",
            "TCP connections on the WS port whose /ws/market upgrade is not answered yet",
            registry=r,
        )
        self.ws_handshakes_shed_total = Counter(
            "tradecanvas_ws_handshakes_shed",
            "TCP connections on the WS port closed at accept: too many handshakes pending, or"
            " every client socket the open-file limit leaves in use",
            registry=r,
        )
        self.http_connections = Gauge(
            "tradecanvas_http_connections",
            "TCP connections open on the HTTP port that are not /ws/market sessions",
            registry=r,
        )
        self.http_connections_shed_total = Counter(
            "tradecanvas_http_connections_shed",
            "TCP connections on the HTTP port closed at accept: 1024 open already, or every"
            " client socket the open-file limit leaves in use",
            registry=r,
        )
        self.ws_rate_limited_total = Counter(
            "tradecanvas_ws_rate_limited",
            "/ws/market client messages refused by the per-connection rate limit"
            " (answered with a rate_limited error)",
            registry=r,
        )
        self.http_refusals_total = Counter(
            "tradecanvas_http_refusals",
            "HTTP API requests answered with an error document, by its code"
            " (unauthorized, ingest_disabled, body_too_large, bad_request, …)",
            ["code"],
            registry=r,
        )
        for code in ("unauthorized", "ingest_disabled"):
            self.http_refusals_total.labels(code=code)
        self.subscriber_statistics = SubscriberStatistics()
        r.register(self.subscriber_statistics)
        self.upstream_reconnects_total = Counter(
            "tradecanvas_upstream_reconnects",
            "Binance WS reconnects by reason: rotation (planned), drop, stale,"
            " server_shutdown, error (ended by an exception, or the connect failed)",
            ["reason"],
            registry=r,
        )
        for reason in RECONNECT_REASONS:
            self.upstream_reconnects_total.labels(reason=reason)
        self.backfill_candles_total = Counter(
            "tradecanvas_backfill_candles", "Candles fetched from Binance REST", registry=r
        )
        self.late_closes_repaired_total = Counter(
            "tradecanvas_late_closes_repaired",
            "Closed klines fetched from REST after the late-close deadline",
            registry=r,
        )
        self.malformed_frames_total = Counter(
            "tradecanvas_malformed_frames",
            "Upstream frames dropped as malformed, by reason",
            ["reason"],
            registry=r,
        )
        self.gaps_total = Counter(
            "tradecanvas_gaps", "gap messages sent to subscribers (one per subscriber)", registry=r
        )
        self.exchange_missing_minutes_total = Counter(
            "tradecanvas_exchange_missing_minutes",
            "Base minutes REST confirmed missing at the exchange (holes kept in the store)",
            registry=r,
        )
        self.ingest_latency_seconds = Histogram(
            "tradecanvas_ingest_latency_seconds",
            "Closed kline: frame received → committed → queued to subscribers",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rest_requests_total = Counter(
            "tradecanvas_rest_requests",
            "Binance REST requests by HTTP status",
            ["status"],
            registry=r,
        )
        self.rest_used_weight = Gauge(
            "tradecanvas_rest_used_weight_1m",
            "Last X-MBX-USED-WEIGHT-1M seen from Binance",
            registry=r,
        )

        self.delivery_latency_seconds = Histogram(
            "tradecanvas_delivery_latency_seconds",
            "Closed-candle batch: newest frame received → sent by the last subscriber it"
            " reached (written to the socket)",
            buckets=DELIVERY_BUCKETS,
            registry=r,
        )
        self.delivery = DeliveryTimer(self.delivery_latency_seconds)
        self.subscriber_queue_high_water = Gauge(
            "tradecanvas_subscriber_queue_high_water",
            "The deepest any subscriber's queue has been in the last one to two minutes"
            " (messages; the bound is subscriber_queue_max; serve/high_water.py)",
            registry=r,
        )
        self.watchdog_last_ping_age_seconds = Gauge(
            "tradecanvas_watchdog_last_ping_age_seconds",
            "Seconds since the systemd watchdog was last pinged (WATCHDOG=1);"
            " NaN when no watchdog runs",
            registry=r,
        )
        self.watchdog_last_ping_age_seconds.set(math.nan)
        # the roles (DESIGN §10): read from the services when scraped (set_function)
        self.dependency_up = Gauge(
            "tradecanvas_dependency_up",
            "1 while a dependency answers: store; redis_publisher, redis_feed, redis_lease"
            " (roles ingest, edge)",
            ["dependency"],
            registry=r,
        )
        self.bus_backlog = Gauge(
            "tradecanvas_bus_backlog",
            "Committed entries waiting for Redis in the bus publisher's outbox",
            registry=r,
        )
        self.bus_events_stream_ahead = Gauge(
            "tradecanvas_bus_events_stream_ahead",
            "Role ingest: by how many ids the events stream's last entry was above the store's"
            " newest event when found (a restored store, or another store's bus: new events"
            " are refused as published); 0 when not (bus/events_ahead.py)",
            registry=r,
        )
        self.bus_filled_candles = Gauge(
            "tradecanvas_bus_filled_candles",
            "Closed candles an edge read from the store to fill holes in the streams (total)",
            registry=r,
        )
        self.store_checkpoint_failures = Gauge(
            "tradecanvas_store_checkpoint_failures",
            "WAL checkpoints of the SQLite store that failed since start (total; a full disk"
            " fails each one, and the WAL grows)",
            registry=r,
        )
        self.store_write_running_seconds = Gauge(
            "tradecanvas_store_write_running_seconds",
            "How long the store write in flight has been running (0 when idle): one waiting"
            " for another process's write lock grows here",
            registry=r,
        )

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
