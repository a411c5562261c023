"""``tradecanvas serve``: ``market_runtime_builder`` and the daemon's nursery tree (DESIGN §4).

::

    tradecanvas serve → RuntimeFlags (from env) → market_runtime_builder(flags)
    └─ daemon nursery: signals, sd_notify/watchdog
       ├─ IngestSupervisor   one task per Binance connection       (roles all, ingest)
       ├─ BusPublisher       committed candles, events, forming → Redis  (ingest, edge)
       ├─ EdgeFeed           Redis Streams (+ store fills) → Hub          (edge)
       ├─ EventTail          another process's events → Hub/bus, ingest (all; ingest leader)
       ├─ WS server          /ws/market on the WS port, a session per subscriber (all, edge)
       └─ HTTP API           /api/market/*, /healthz, /readyz, /metrics; /ws/market (all, edge)

Roles (DESIGN §10, docs/distributed.md): ``all`` publishes to its own Hub; ``ingest``
publishes to the bus only and serves no /ws/market; ``edge`` has no Binance connection, its
Hub is fed by the EdgeFeed, and its pipeline (the strict HTTP write path) publishes to the
bus, so the edge that took a write delivers it from the streams like every other edge: once.

One store, one hub (none on ingest), one pipeline: every ingest path (the Binance loop,
REST repair, the HTTP write) goes through the same :class:`IngestPipeline` instance; one
:class:`MarketEndpoint` over the hub serves /ws/market on both ports (DESIGN §10, one origin).

Lifecycle. READY=1 only after the store is open and both listeners are bound. SIGTERM or
SIGINT: STOPPING=1; the ingest supervisor is cancelled first and commits its pending closed
candles (shielded, bounded); then every subscriber, on either port, is closed with 1001, the
WS server drains its connections and the HTTP server its requests (bounded; what is left is
aborted); the store is closed; exit 0, all within :data:`DRAIN_DEADLINE_S`. A
second signal exits at once. A store failure ends the daemon with exit code
:data:`ExitCode.STORE_FAILURE` so systemd restarts it; the batch in flight was rolled back,
never half written. One the ingest meets while running that waiting cures (a full disk, a
read-only file system, a lock held elsewhere) first stops the ingest only: the daemon serves
what is stored, ``/readyz`` false, until a write goes through (``ingest/store_outage.py``).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Mapping
from typing import Final, final

import attrs
import trio
from starlette.applications import Starlette

from tradecanvas.bus.feed import EdgeFeed
from tradecanvas.bus.leader import FencedStore, IngestLeader
from tradecanvas.bus.publisher import BusPublisher
from tradecanvas.bus.roles import (
    bus_readiness,
    check_redis_settings,
    edge_feed_from_store,
    last_event_id,
    leader_from_flags,
    publisher_from_flags,
    watch_dependencies,
)
from tradecanvas.errors import ExitCode, expected_restart, start_failure
from tradecanvas.ingest.store_outage import StoreOutage
from tradecanvas.ingest.supervisor import IngestSupervisor
from tradecanvas.ops.build import VERSION
from tradecanvas.ops.heap import freeze_startup_heap
from tradecanvas.ops.logs import configure_logging
from tradecanvas.ops.metrics import Metrics
from tradecanvas.ops.sd_notify import SdNotifier, run_watchdog
from tradecanvas.ops.services import run_in_scope, wait_for_signal
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.serve.event_tail import EventTail
from tradecanvas.serve.http_api import build_http_app
from tradecanvas.serve.http_server import serve_http
from tradecanvas.serve.hub import Hub
from tradecanvas.serve.listening import check_listenable, http_url_of
from tradecanvas.serve.shedding import MAX_HTTP_CONNECTIONS, ClientSockets, http_gate
from tradecanvas.serve.upstream_view import connections_of
from tradecanvas.serve.ws_server import MAX_PENDING_HANDSHAKES, serve_ws_port
from tradecanvas.serve.ws_session import MarketEndpoint
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import (
    describe_location,
    open_served_store,
    schema_change,
    store_location,
)
from tradecanvas.store.postgres import PostgresStore
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.upstream.plan import futures_ws_route_warning

log = logging.getLogger(__name__)

# systemd's TimeoutStopSec in deploy/tradecanvas.service sits above this.
DRAIN_DEADLINE_S: Final = 10.0
# Of the drain: the ingest flush first, then subscribers and HTTP share what is left.
INGEST_DRAIN_S: Final = 5.0
# A write running longer than this means the pipeline is stuck: stop feeding the watchdog.
STUCK_WRITE_S: Final = 20.0
# /readyz says a write is slow past this (a lock held elsewhere; a commit is milliseconds)
SLOW_WRITE_S: Final = 10.0
# How often the STATUS= line shown by `systemctl status` is refreshed.
STATUS_INTERVAL_S: Final = 10.0
# How often a PostgreSQL store is pinged for /readyz while nothing else reaches it.
STORE_PING_INTERVAL_S: Final = 2.0


@final
@attrs.define
class MarketRuntime:
    """Everything ``serve`` runs, built once by :func:`market_runtime_builder`."""

    flags: RuntimeFlags
    metrics: Metrics
    store: MarketStore
    pipeline: IngestPipeline
    http_app: Starlette
    notifier: SdNotifier
    # what a role runs (module docstring): None where the role has no such part
    own_hub: Hub | None = None
    own_market: MarketEndpoint | None = None
    ingest: IngestSupervisor | None = None
    bus_publisher: BusPublisher | None = None
    edge_feed: EdgeFeed | None = None
    leader: IngestLeader | None = None  # role ingest: the lease; the supervisor runs once held
    outage: StoreOutage | None = None  # the ingest through a store that takes no writes
    # events other processes (import, backfill) append to the store (all; ingest: leader)
    event_tail: EventTail | None = None
    # the client sockets both ports may hold together (the open-file limit's budget)
    client_sockets: ClientSockets = attrs.field(factory=lambda: ClientSockets(None))
    listening: dict[str, int] = attrs.field(factory=dict)

    @property
    def hub(self) -> Hub:
        if self.own_hub is None:
            raise LookupError(f"role {self.flags.role} has no hub")
        return self.own_hub

    @property
    def market(self) -> MarketEndpoint:
        if self.own_market is None:
            raise LookupError(f"role {self.flags.role} serves no /ws/market")
        return self.own_market

    @property
    def supervisor(self) -> IngestSupervisor:
        if self.ingest is None:
            raise LookupError(f"role {self.flags.role} has no Binance ingest")
        return self.ingest

    def readiness(self) -> Mapping[str, bool]:
        listeners = {"ws", "http"} if self.own_market is not None else {"http"}
        checks = {
            "store_open": not self.store.closed,
            # a write waiting on another process's lock (SQLite: 30 s, then exit 3)
            "store_writes_progressing": self.store.write_running_for() < SLOW_WRITE_S,
            "listeners_bound": listeners <= set(self.listening),
        }
        if isinstance(self.store, PostgresStore):
            checks["store_reachable"] = self.store.reachable
        if self.outage is not None:
            checks["store_writable"] = self.outage.writable()
        if self.ingest is not None and (self.leader is None or self.leader.leader):
            checks["upstream_connected"] = self.ingest.upstream_connected()
        checks.update(bus_readiness(self.bus_publisher, self.edge_feed, self.leader))
        return checks

    def pipeline_progressing(self) -> bool:
        return self.store.write_running_for() < STUCK_WRITE_S

    def status_line(self) -> str:
        """One line of state for systemd's STATUS=."""
        parts = []
        if self.leader is not None:
            parts.append("ingest leader" if self.leader.leader else "ingest standby")
        if self.ingest is not None:
            ingest = self.ingest.statistics()
            parts.append(
                f"upstream {ingest.connected}/{ingest.connections} connected, "
                f"{ingest.streams} streams; {ingest.committed_candles} candles committed, "
                f"{ingest.held_candles} held, {ingest.reconnects} reconnects"
            )
        if self.bus_publisher is not None:
            health = self.bus_publisher.health()
            state = "connected" if health.connected else "DISCONNECTED"
            parts.append(f"bus {state}, {health.backlog} waiting")
        if self.edge_feed is not None:
            feed = self.edge_feed.statistics()
            state = "connected" if self.edge_feed.health().connected else "DISCONNECTED"
            parts.append(f"feed {state}, {feed.candles} candles, {feed.filled_candles} filled")
        if self.own_hub is not None:
            parts.append(f"{self.own_hub.statistics().subscribers} subscribers")
        return "; ".join(parts)


async def _watch_store(store: PostgresStore) -> None:
    """Ping the PostgreSQL store so /readyz and the metric see an outage on a quiet node
    (an edge may go minutes without a store read)."""
    while True:
        await store.ping()
        await trio.sleep(STORE_PING_INTERVAL_S)


async def _report_status(runtime: MarketRuntime) -> None:
    """Refresh STATUS= while the daemon runs (only under systemd)."""
    while True:
        await trio.sleep(STATUS_INTERVAL_S)
        runtime.notifier.status(runtime.status_line())


async def market_runtime_builder(flags: RuntimeFlags) -> MarketRuntime:
    """Open the store and build what ``flags.role`` runs: the hub and /ws/market endpoint
    (all, edge), the pipeline, the supervisor (all, ingest), the bus (ingest, edge) and the
    HTTP app."""
    metrics = Metrics()
    metrics.role_info.labels(role=flags.role).set(1)
    # SQLite, or PostgreSQL with TRADE_CANVAS_DATABASE_URL; locked when this daemon ingests
    store = await open_served_store(store_location(flags.db_path, flags.database_url), flags.role)
    change = schema_change(store)
    schema = "-" if change is None else str(change.after)
    metrics.build_info.labels(version=VERSION, schema=schema).set(1)
    role = flags.role
    hub: Hub | None = None
    market: MarketEndpoint | None = None
    if role != "ingest":
        hub = Hub(
            store,
            series=flags.all_series(),
            queue_max=flags.subscriber_queue_max,
            send_timeout_s=flags.subscriber_send_timeout_s,
            catchup_limit=flags.market_ws_catchup_limit,
            metrics=metrics,
        )
        market = MarketEndpoint(
            hub,
            allowed_origins=flags.ws_allowed_origins,
            max_subscriptions=flags.max_subscriptions,
            stall_timeout_s=flags.subscriber_stall_timeout_s,
            max_connections=flags.max_connections,
        )
    publisher = publisher_from_flags(flags) if role != "all" else None
    feed: EdgeFeed | None = None
    if role == "edge":
        feed = await edge_feed_from_store(flags, store, [str(s) for s in flags.all_series()])
    # all: straight to the hub; ingest and edge: to the bus, and an edge's hub from the feed
    target = hub if publisher is None else publisher
    assert target is not None
    leader: IngestLeader | None = None
    pipeline_store: MarketStore = store
    if role == "ingest":
        # the ingest's writes are fenced: only the lease holder's commits go in
        pipeline_store = FencedStore(store)
        leader = leader_from_flags(flags, pipeline_store, metrics)
    event_tail: EventTail | None = None
    if role != "edge":
        event_tail = EventTail(store, target, cursor=await last_event_id(store))
        pipeline_store = event_tail.own_store(pipeline_store)
    pipeline = IngestPipeline.from_flags(pipeline_store, target, flags)
    supervisor: IngestSupervisor | None = None
    if role != "edge":
        # series.added / series.removed against the set the store was last served with
        for event in await pipeline.record_served_series([str(s) for s in flags.all_series()]):
            log.info("%s", event.message)
        supervisor = IngestSupervisor(
            flags,
            pipeline,
            target,
            metrics,
            enable_pipeline_publish=flags.enable_ingest_ws_pipeline_publish,
        )
        if leader is not None:  # the lease holder tells the edges of Binance
            leader.upstream_connected = supervisor.upstream_connected
            leader.connections = supervisor.connection_states
        if event_tail is not None:  # history an import stores reaches the forming bars
            event_tail.on_foreign = supervisor.history_changes.note_events
    runtime_ref: list[MarketRuntime] = []
    http_app = build_http_app(
        store=store,
        pipeline=pipeline,
        flags=flags,
        metrics=metrics,
        readiness=lambda: runtime_ref[0].readiness(),
        about=lambda: {} if feed is None else feed.ingest_report.readyz_fields(),
        connections=connections_of(supervisor, feed),
        market=market,
    )
    notifier = SdNotifier.from_flags(flags)
    runtime = MarketRuntime(
        flags,
        metrics,
        store,
        pipeline,
        http_app,
        notifier,
        own_hub=hub,
        own_market=market,
        ingest=supervisor,
        outage=None if supervisor is None else StoreOutage(store),
        bus_publisher=publisher,
        edge_feed=feed,
        leader=leader,
        event_tail=event_tail,
        client_sockets=ClientSockets.within_open_files_limit(
            MAX_HTTP_CONNECTIONS
            + (0 if role == "ingest" else flags.max_connections + MAX_PENDING_HANDSHAKES)
        ),
    )
    runtime_ref.append(runtime)
    outage = runtime.outage  # a store taking no writes is down (the alert), as on /readyz
    watch_dependencies(metrics, store, publisher, feed, outage.writable if outage else None)
    return runtime


async def run_daemon(
    runtime: MarketRuntime,
    *,
    stop: trio.Event | None = None,
    task_status: trio.TaskStatus[Mapping[str, int]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """The daemon nursery. ``started()`` reports the bound ports after READY=1."""
    flags, stop = runtime.flags, trio.Event() if stop is None else stop
    ingest_scope, ws_scope, http_scope = trio.CancelScope(), trio.CancelScope(), trio.CancelScope()
    bus_scope, feed_scope = trio.CancelScope(), trio.CancelScope()
    ingest_done, ws_done, http_done = trio.Event(), trio.Event(), trio.Event()
    bus_done, feed_done = trio.Event(), trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(wait_for_signal, stop)
        if isinstance(runtime.store, PostgresStore):
            nursery.start_soon(_watch_store, runtime.store)
            if runtime.store.lock is not None:  # lost to another daemon: stop (exit 3)
                nursery.start_soon(runtime.store.lock.hold)
        elif isinstance(runtime.store, CandleStore):  # deleted or replaced under it: stop
            nursery.start_soon(runtime.store.watch_file)
        if runtime.own_market is not None:
            runtime.listening["ws"] = await nursery.start(
                run_in_scope,
                ws_scope,
                ws_done,
                functools.partial(
                    serve_ws_port,
                    runtime.own_market,
                    host=flags.ws_host,
                    port=flags.ws_port,
                    sockets=runtime.client_sockets,
                    http_url=http_url_of(flags.http_host, flags.http_port),
                ),
            )
        else:
            ws_done.set()
        runtime.listening["http"] = await nursery.start(
            run_in_scope,
            http_scope,
            http_done,
            functools.partial(
                serve_http,
                runtime.http_app,
                host=flags.http_host,
                port=flags.http_port,
                send_timeout_s=flags.http_send_timeout_s,
                gate=http_gate(runtime.client_sockets, runtime.metrics),
            ),
        )
        # the bus publisher before its sources; it never waits for Redis to start
        if runtime.bus_publisher is not None:
            await nursery.start(run_in_scope, bus_scope, bus_done, runtime.bus_publisher.run)
        else:
            bus_done.set()
        if runtime.edge_feed is not None:
            await nursery.start(
                run_in_scope,
                feed_scope,
                feed_done,
                functools.partial(
                    runtime.edge_feed.run, runtime.hub, delivery=runtime.metrics.delivery
                ),
            )
        lease_scope, lease_done, ingest_started = trio.CancelScope(), trio.Event(), [False]
        if runtime.ingest is not None and runtime.outage is not None:
            ingest_run = functools.partial(runtime.outage.run_ingest, runtime.ingest.run)
        if runtime.ingest is not None and runtime.leader is not None:
            # role ingest: the supervisor runs once this node holds the lease
            async def start_ingest() -> None:
                ingest_started[0] = True
                if runtime.event_tail is not None:
                    nursery.start_soon(runtime.event_tail.run)
                await nursery.start(run_in_scope, ingest_scope, ingest_done, ingest_run)

            await nursery.start(
                run_in_scope,
                lease_scope,
                lease_done,
                functools.partial(runtime.leader.run, start_ingest),
            )
        elif runtime.ingest is not None:
            ingest_started[0] = True
            if runtime.event_tail is not None:
                nursery.start_soon(runtime.event_tail.run)
            await nursery.start(run_in_scope, ingest_scope, ingest_done, ingest_run)
        http = runtime.listening["http"]
        ws = runtime.listening.get("ws")
        freeze_startup_heap()  # full collections walk what came after, not start-up's heap
        runtime.notifier.ready()
        ports = f"ws :{ws} http :{http}" if ws is not None else f"http :{http}"
        runtime.notifier.status(f"role {flags.role}; {len(flags.series)} series; {ports}")
        if runtime.notifier.enabled:
            nursery.start_soon(_report_status, runtime)
        log.info(
            # tests and tools parse "ready ws=… http=…": new fields go at the end
            "tradecanvas ready ws=%s http=http://%s:%d db=%s publish_path=%s role=%s bus=%s"
            " version=%s",
            "-" if ws is None else f"ws://{flags.ws_host}:{ws}/ws/market",
            flags.http_host,
            http,
            describe_location(store_location(flags.db_path, flags.database_url)),
            "pipeline" if flags.enable_ingest_ws_pipeline_publish else "legacy",
            flags.role,
            "-" if runtime.bus_publisher is None else f"{flags.bus_prefix}:*",
            VERSION,
        )
        if ws is not None:
            ws_on_http = f"ws://{flags.http_host}:{http}/ws/market"
            log.info("/ws/market is served on the HTTP port too: %s", ws_on_http)
        watchdog_interval_s = runtime.notifier.watchdog_interval_s
        if watchdog_interval_s is not None:
            nursery.start_soon(
                functools.partial(
                    run_watchdog,
                    runtime.notifier,
                    interval_s=watchdog_interval_s,
                    is_progressing=runtime.pipeline_progressing,
                    metrics=runtime.metrics,
                )
            )
        task_status.started(dict(runtime.listening))
        await stop.wait()

        runtime.notifier.stopping()
        deadline = trio.current_time() + DRAIN_DEADLINE_S
        # 1. stop the sources; the ingest commits what it holds (shielded and bounded inside)
        lease_scope.cancel(reason="shutdown")
        ingest_scope.cancel(reason="shutdown")
        feed_scope.cancel(reason="shutdown")
        if ingest_started[0]:
            with trio.move_on_at(trio.current_time() + INGEST_DRAIN_S):
                await ingest_done.wait()
        if runtime.leader is not None:
            # after the ingest's last commit: a standby takes over at once
            await runtime.leader.release()
        # 2. every subscriber, on either port, gets 1001; both servers drain
        if runtime.own_market is not None:
            runtime.own_market.shutdown()
        ws_scope.cancel(reason="shutdown")
        http_scope.cancel(reason="shutdown")
        with trio.move_on_at(deadline - 0.5):
            await ws_done.wait()
            await http_done.wait()
        # 3. the bus publisher sends what was committed (Redis may be away: bounded)
        if runtime.bus_publisher is not None:
            runtime.bus_publisher.close()
            with trio.move_on_at(deadline - 0.25):
                await bus_done.wait()
            if not bus_done.is_set():
                log.warning(
                    "bus publisher: %d entries not sent at shutdown (edges read them from "
                    "the store)",
                    runtime.bus_publisher.health().backlog,
                )
        nursery.cancel_scope.cancel(reason="shutdown")


def serve(flags: RuntimeFlags) -> int:
    """``tradecanvas serve``: run until SIGTERM/SIGINT; the exit code for systemd."""
    configure_logging(flags)

    async def main() -> None:
        route_warning = futures_ws_route_warning(flags)  # Binance's host without /market: 2
        if route_warning is not None:
            log.warning("%s", route_warning)
        await check_listenable(flags)  # a port in use: said before the store is written
        await check_redis_settings(flags)  # and a Redis refusing the URL's database
        runtime = await market_runtime_builder(flags)
        try:
            await run_daemon(runtime)
        finally:
            with trio.CancelScope(shield=True):
                await runtime.store.aclose()
        log.info("tradecanvas stopped")

    try:
        trio.run(main)
    except BaseException as raised:  # one line: a store failure, a refused flag or port
        failure = start_failure(raised)
        if failure is None:
            raise
        code, line, traceback = failure
        level = logging.WARNING if expected_restart(raised) else logging.CRITICAL
        log.log(level, "%s", line, exc_info=raised if traceback else None)
        return code
    sys.stderr.flush()
    return ExitCode.OK
