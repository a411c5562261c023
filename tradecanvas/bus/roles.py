"""The bus as the daemon's roles use it: a :class:`BusPublisher` and an :class:`EdgeFeed` made
from RuntimeFlags, the feed's holes filled from the shared store (DESIGN §10).

- ``ingest`` and ``edge`` both publish through a :func:`publisher_from_flags`: the ingest's
  pipeline and supervisor, the edge's strict HTTP write path. Every edge — the one that took
  the write too — gets those candles from the streams, once.
- ``ingest`` runs its supervisor only while it holds the lease (:func:`leader_from_flags`,
  ``bus/lease.py``): two ingest nodes are a holder and a hot standby.
- ``edge`` feeds its Hub with :func:`edge_feed_from_store`: positions start at the store's
  head of each served series and the event log's last id (the Hub's subscribers catch up
  from the store; the feed brings what is committed after that).

Errors: the store reads at start-up raise StoreError; the feed's fills are tried again
while the store fails (an outage of PostgreSQL: the edge waits for it, /readyz says so).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, TypeVar

import orjson
import trio
from prometheus_client import Gauge

from tradecanvas.bus.feed import EdgeFeed, FeedSettings
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.leader import FencedStore, IngestLeader
from tradecanvas.bus.lease import LeaseTiming
from tradecanvas.bus.publisher import BusPublisher, PublisherSettings
from tradecanvas.bus.redis_io import refused_settings
from tradecanvas.errors import FlagError, StoreError
from tradecanvas.model import Candle
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import SERVED_SERIES_KEY
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.service_urls import url_without_password
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.postgres import PostgresStore
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.upstream.backoff import Backoff

log = logging.getLogger(__name__)
T = TypeVar("T")
FILL_BACKOFF: Final = Backoff(base_s=0.1, cap_s=5.0)

# store rows per fill read: a trimmed-away week of 1m bars is ten pages
FILL_PAGE: Final = 1_000
# event log rows per read while looking for its last id at start-up
EVENT_SCAN_PAGE: Final = 10_000


def stream_keys(flags: RuntimeFlags) -> StreamKeys:
    return StreamKeys(f"{flags.bus_prefix}:")


def _redis_url(flags: RuntimeFlags) -> str:
    if flags.redis_url is None:  # build_runtime_flags refuses a split role without it
        raise ValueError(f"role {flags.role} needs TRADE_CANVAS_REDIS_URL")
    return flags.redis_url


async def check_redis_settings(flags: RuntimeFlags) -> None:
    """FlagError (exit 2, before the store is opened) when the Redis of an ingest or edge
    refuses the URL's own settings (a database index it lacks, a wrong password): the bus
    would retry that for ever. A Redis that does not answer yet is waited for, as later."""
    if flags.role == "all" or flags.redis_url is None:
        return
    refusal = await refused_settings(flags.redis_url)
    if refusal is not None:
        where = url_without_password(flags.redis_url)
        raise FlagError("TRADE_CANVAS_REDIS_URL", f"the Redis at {where} refuses it: {refusal}")


def publisher_from_flags(flags: RuntimeFlags) -> BusPublisher:
    return BusPublisher(
        _redis_url(flags), PublisherSettings(keys=stream_keys(flags), maxlen=flags.bus_maxlen)
    )


async def _patiently(what: str, read: Callable[[], Awaitable[T]]) -> T:
    """A fill's store read, tried again (capped backoff) while the store fails: the feed
    cannot deliver past a hole anyway, and ending the edge would drop its subscribers."""
    attempt = 0
    while True:
        try:
            got = await read()
        except StoreError as exc:
            attempt += 1
            delay = FILL_BACKOFF.ceiling(attempt)
            log.warning(
                "edge feed: reading %s from the store failed (%s); again in %.1f s",
                what,
                exc,
                delay,
            )
            await trio.sleep(delay)
            continue
        if attempt:
            log.info("edge feed: read %s from the store after %d failures", what, attempt)
        return got


def leader_from_flags(flags: RuntimeFlags, store: FencedStore, metrics: Metrics) -> IngestLeader:
    """The ingest lease of ``--role ingest`` (``bus/lease.py``): the pipeline's store is
    ``store``, whose writes the lease fences."""
    return IngestLeader(
        _redis_url(flags),
        stream_keys(flags),
        store,
        metrics,
        timing=LeaseTiming(flags.ingest_lease_ms),
    )


def unserved_by_ingest(series: Sequence[str], served_text: str | None) -> list[str]:
    """Of an edge's ``series``, those not in the set the ingest last served (the store's
    ``served_series`` record, JSON); none when there is no record yet (no ingest started)."""
    if served_text is None:
        return []
    try:
        served = set(orjson.loads(served_text))
    except (orjson.JSONDecodeError, TypeError):
        return []
    return sorted(set(series) - served)


async def last_event_id(store: MarketStore) -> int:
    """The event log's newest id (0 when it is empty)."""
    last = 0
    while page := await store.events_after(last, limit=EVENT_SCAN_PAGE):
        last = page[-1].event_id
    return last


async def edge_feed_from_store(
    flags: RuntimeFlags, store: MarketStore, series: Sequence[str]
) -> EdgeFeed:
    """An edge's feed of ``series``, positioned at the store's heads now (with a warning
    for each of them the ingest does not serve: see :func:`unserved_by_ingest`)."""
    unserved = unserved_by_ingest(series, await store.get_meta(SERVED_SERIES_KEY))
    if unserved:
        log.warning(
            "this edge serves %d series the ingest does not (the store's last served set): %s."
            " They will stay empty: give the edges the ingest's TRADE_CANVAS_SERIES and"
            " TRADE_CANVAS_DERIVED_TIMEFRAMES",
            len(unserved),
            ", ".join(unserved[:10]) + (" …" if len(unserved) > 10 else ""),
        )
    heads = await store.heads()
    positions: dict[str, int | None] = {
        sid: (heads[sid].head_time if sid in heads else None) for sid in series
    }

    async def fill_candles(series_id: str, after: int | None, before: int | None) -> list[Candle]:
        got = await _patiently(
            f"candles of {series_id} after {after}",
            lambda: store.since(series_id, -1 if after is None else after, FILL_PAGE),
        )
        return [c for c in got if before is None or c.candle_time < before]

    async def fill_events(after: int, before: int | None) -> list[SystemEvent]:
        got = await _patiently(
            f"events after {after}", lambda: store.events_after(after, limit=FILL_PAGE)
        )
        return [SystemEvent.from_stored(e) for e in got if before is None or e.event_id < before]

    return EdgeFeed(
        _redis_url(flags),
        series=positions,
        events_after=await last_event_id(store),
        fill_candles=fill_candles,
        fill_events=fill_events,
        settings=FeedSettings(keys=stream_keys(flags)),
    )


def bus_readiness(
    publisher: BusPublisher | None, feed: EdgeFeed | None, leader: IngestLeader | None
) -> dict[str, bool]:
    """``/readyz``'s checks of the bus: the publisher's (with the streams' on role ingest,
    the bus is what it is for), the edge feed's connection, and the ingest lease's —
    holder and standby alike: a standby whose Redis does not answer cannot take over, and
    its idle publisher does not notice (it talks to Redis only with something to send)."""
    checks: dict[str, bool] = {}
    if leader is not None:
        checks["bus_lease_connected"] = leader.redis_answers
    if publisher is not None:
        checks.update(publisher.readiness(streams=leader is not None))
    if feed is not None:
        checks["bus_feed_connected"] = feed.health().connected
    return checks


def watch_dependencies(
    metrics: Metrics,
    store: MarketStore,
    publisher: BusPublisher | None,
    feed: EdgeFeed | None,
    store_writable: Callable[[], bool] | None = None,
) -> None:
    """Metrics per dependency, read from the services when /metrics is scraped. The store
    is down while unreachable (PostgreSQL), closed, or taking no writes
    (``store_writable``: the ingest's store outage, as ``/readyz``'s ``store_writable``)."""
    up = metrics.dependency_up
    writable = store_writable or (lambda: True)
    metrics.store_write_running_seconds.set_function(store.write_running_for)
    if isinstance(store, PostgresStore):
        pg = store
        up.labels(dependency="store").set_function(lambda: float(pg.reachable and writable()))
    else:
        up.labels(dependency="store").set_function(lambda: float(not store.closed and writable()))
        if isinstance(store, CandleStore):
            sqlite = store
            metrics.store_checkpoint_failures.set_function(
                lambda: float(sqlite.checkpoint_failures())
            )
    if publisher is not None:
        up.labels(dependency="redis_publisher").set_function(
            lambda: float(publisher.health().connected)
        )
        metrics.bus_backlog.set_function(lambda: float(publisher.health().backlog))
        metrics.bus_events_stream_ahead.set_function(
            lambda: float(publisher.events_ahead.ids_ahead())
        )
        registry = metrics.registry
        Gauge(
            "tradecanvas_bus_blocked_streams",
            "Streams whose top is an ID no tradecanvas writer made, so Redis refuses every"
            " entry of them (bus/refusals.py)",
            registry=registry,
        ).set_function(lambda: float(len(publisher.blocked_streams())))
        Gauge(
            "tradecanvas_bus_blocked_entries",
            "Entries not published because their stream was blocked (total)",
            registry=registry,
        ).set_function(lambda: float(publisher.statistics().outbox.blocked))
    if feed is not None:
        up.labels(dependency="redis_feed").set_function(lambda: float(feed.health().connected))
        metrics.bus_filled_candles.set_function(lambda: float(feed.statistics().filled_candles))
