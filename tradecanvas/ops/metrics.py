"""Prometheus metrics (DESIGN §5), one registry per daemon so tests stay independent."""

from __future__ import annotations

from typing import Final, final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

# the *_created series only double the exposition; nothing of ours reads them
disable_created_metrics()  # type: ignore[no-untyped-call]

PUBLISH_PATHS: Final = ("legacy", "pipeline", "http")
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


@final
class Metrics:
    """Owns a CollectorRegistry and every tradecanvas metric. Components take one."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
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

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
