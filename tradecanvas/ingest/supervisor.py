"""IngestSupervisor: every Binance connection of the daemon, each its own ingest loop.

Task tree::

    IngestSupervisor.run             the shared REST client (httpx) for every loop
    ├─ rate limits                   exchangeInfo's weight limits, once, in the background
    ├─ 3d phases                     when a phased timeframe (3d) is configured, in the
    │                                background: each base series' grid phase (learn_phase),
    │                                then its 3d history derived and published
    └─ one per connection_groups()   run_binance_ws_ingest_loop, restarted after a crash
"""

from __future__ import annotations

import logging
from typing import final

import attrs
import trio

from tradecanvas.errors import PublishError, StoreError, UpstreamError, WireError, find_in_group
from tradecanvas.ingest.history_refresh import HistoryChanges
from tradecanvas.ingest.loop import LoopCounters, run_binance_ws_ingest_loop
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.publish import publish_pipeline_result_from_ws
from tradecanvas.model import SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.pipeline.publish import MarketSink
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.records import StoreBanMemory
from tradecanvas.upstream.phases import learn_phase
from tradecanvas.upstream.plan import connection_groups
from tradecanvas.upstream.rest import BinanceRestClient, RestPolicy, open_rest_client

log = logging.getLogger(__name__)


@attrs.frozen
class IngestStatistics:
    """A snapshot of the supervisor (frozen; the daemon's STATUS= line)."""

    streams: int
    connections: int  # configured connections (groups of at most 200 streams)
    connected: int  # sockets open now
    reconnects: int
    committed_candles: int
    held_candles: int  # closed candles waiting above a hole for REST
    # the kill-switch value each run_binance_ws_ingest_loop received (None: not started yet)
    loops_enable_pipeline_publish: tuple[bool | None, ...]


@attrs.frozen
class ConnectionState:
    """One Binance connection as /healthz and the ingest report tell of it: its market, the
    base series it carries (as ``series_id`` strings) and whether its socket is open."""

    market: str
    series: tuple[str, ...]
    connected: bool


@final
class IngestSupervisor:
    """Owns the Binance connections of ``flags.series``: one run_binance_ws_ingest_loop per
    connection of at most 200 streams per market, and the shared httpx client.

    A loop that crashes is restarted after a capped, jittered backoff; a crash never takes
    the daemon down — except StoreError, which :meth:`run` raises (the store is gone).
    Cancel :meth:`run` to stop: every loop commits its pending closed candles first.

    A phased timeframe (Binance's 3d) needs each symbol's grid phase: it is learned in the
    background (live frames never wait for it); then ``pipeline.set_phase``, the series' 3d
    history is derived and published, and only then does the series' loop build forming 3d
    candles (``phases``), so none goes out before the closed 3d bars below it.
    """

    def __init__(
        self,
        flags: RuntimeFlags,
        pipeline: IngestPipeline,
        hub: MarketSink,
        metrics: Metrics,
        *,
        enable_pipeline_publish: bool,
        policy: IngestPolicy | None = None,
        rest_policy: RestPolicy | None = None,
    ) -> None:
        self.flags = flags
        self.pipeline = pipeline
        self.hub = hub
        self.metrics = metrics
        self.enable_pipeline_publish = enable_pipeline_publish
        self.policy = policy or IngestPolicy()
        self.rest_policy = rest_policy
        self.groups = connection_groups(flags.series)
        self._counters = [LoopCounters(streams=len(g)) for g in self.groups]
        # each connection's series as strings, once: /healthz reads them on every poll
        self._group_ids = [tuple(map(str, g)) for g in self.groups]
        # base series → its 3d grid phase (seconds), once its 3d history is published; the
        # loops read it for their forming 3d candles
        self.phases: dict[SeriesId, int] = {}
        self.phases_learned = trio.Event()  # set once every series was tried
        # another process's factor.rebuild (the event tail's) → the loop of its series
        self.history_changes = HistoryChanges()
        self._fatal: StoreError | None = None
        self.rest: BinanceRestClient | None = None
        # set once exchangeInfo's weight limits were read (or could not be) for every market
        self.rate_limits_loaded = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with open_rest_client(
            self.flags,
            metrics=self.metrics,
            policy=self.rest_policy,
            bans=StoreBanMemory(self.pipeline.store),
        ) as rest:
            self.rest = rest
            async with trio.open_nursery() as nursery:
                # in the background: live frames and backfill never wait for it
                nursery.start_soon(self._load_rate_limits, self.rest)
                nursery.start_soon(self._derive_phased, self.rest, nursery.cancel_scope)
                for group, counters in zip(self.groups, self._counters, strict=True):
                    nursery.start_soon(
                        self._supervise, group, counters, self.rest, nursery.cancel_scope
                    )
                task_status.started()
        if self._fatal is not None:
            raise self._fatal

    async def _load_rate_limits(self, rest: BinanceRestClient) -> None:
        """Best effort: on failure the usual limits stay in use (BINANCE.md), and the
        ``X-MBX-USED-WEIGHT-1M`` of every answer still paces the requests."""
        try:
            for market in sorted({group[0].market for group in self.groups}):
                try:
                    limit = await rest.load_rate_limits(market)
                except (UpstreamError, WireError) as exc:
                    log.warning(
                        "binance %s: exchangeInfo rate limits unavailable (%s); using %d/min",
                        market,
                        exc,
                        rest.statistics().weight_limit.get(market, 0),
                    )
                else:
                    log.info("binance %s: request weight limit %d/min", market, limit)
        finally:
            self.rate_limits_loaded.set()

    async def _derive_phased(self, rest: BinanceRestClient, scope: trio.CancelScope) -> None:
        """For a configured phased timeframe (3d): each base series' phase, from Binance or
        the store's memory (``learn_phase`` logs where it came from); then the series' 3d
        history is derived and published by the kill-switch's path. A series whose phase
        nobody knows gets no 3d bars (learn_phase warns). Raises nothing: a StoreError
        stops the ingest as in the loops."""
        phased = [tf for tf in self.flags.derived_timeframes if tf.phased]
        try:
            for sid in self.flags.series if phased else ():
                phase: int | None = None
                for tf in phased:
                    phase = await learn_phase(sid, tf, rest, self.pipeline.store)
                    if phase is None:
                        break
                    self.pipeline.set_phase(sid, phase)
                    result = await self.pipeline.derive_history(sid, tf)
                    try:
                        publish_pipeline_result_from_ws(
                            result,
                            pipeline=self.pipeline,
                            hub=self.hub,
                            metrics=self.metrics,
                            enable_pipeline_publish=self.enable_pipeline_publish,
                        )
                    except PublishError as exc:  # isolated by the hub; the store has them
                        log.warning("%s %s history: publish failed: %s", sid, tf, exc)
                    log.info("%s: %s history derived (%d bars)", sid, tf, result.committed)
                if phase is not None:
                    self.phases[sid] = phase
        except StoreError as exc:
            self._stop_on(exc, scope)
        finally:
            self.phases_learned.set()

    async def _supervise(
        self,
        group: tuple[SeriesId, ...],
        counters: LoopCounters,
        rest: BinanceRestClient,
        scope: trio.CancelScope,
    ) -> None:
        crashes = 0
        while True:
            started_at = trio.current_time()
            try:
                await run_binance_ws_ingest_loop(
                    group,
                    flags=self.flags,
                    rest=rest,
                    pipeline=self.pipeline,
                    hub=self.hub,
                    metrics=self.metrics,
                    enable_pipeline_publish=self.enable_pipeline_publish,
                    policy=self.policy,
                    counters=counters,
                    phases=self.phases,
                    history_changes=self.history_changes,
                )
            except StoreError as exc:
                self._stop_on(exc, scope)
                return
            except Exception as exc:
                store_error = find_in_group(exc, StoreError)
                if store_error is not None:
                    # a store failure inside one of the loop's own nurseries is fatal too
                    self._stop_on(store_error, scope)
                    return
                log.exception("ingest loop for %s crashed; restarting", [str(s) for s in group])
            else:
                log.error("ingest loop for %s returned; restarting", [str(s) for s in group])
            ran = trio.current_time() - started_at
            crashes = 1 if ran >= self.policy.connection.healthy_after_s else crashes + 1
            await trio.sleep(self.policy.restart_backoff.delay(crashes))

    def _stop_on(self, exc: StoreError, scope: trio.CancelScope) -> None:
        """A store failure ends the ingest: :meth:`run` raises it and the daemon logs it, in
        its one line, and exits with ExitCode.STORE_FAILURE (so nothing is logged here)."""
        log.debug("the candle store failed; stopping the ingest: %s", exc)
        self._fatal = exc
        scope.cancel()

    def upstream_connected(self) -> bool:
        """True when every connection has an open socket (for /readyz)."""
        return bool(self._counters) and all(c.connection.connected > 0 for c in self._counters)

    def connection_states(self) -> tuple[ConnectionState, ...]:
        """Each connection's state (for /healthz: the upstream of one series, and how many
        connections of each market are open; for the ingest report the edges read)."""
        return tuple(
            ConnectionState(group[0].market, ids, c.connection.connected > 0)
            for group, ids, c in zip(self.groups, self._group_ids, self._counters, strict=True)
        )

    def statistics(self) -> IngestStatistics:
        cs = self._counters
        return IngestStatistics(
            streams=sum(c.streams for c in cs),
            connections=len(cs),
            connected=sum(c.connection.connected for c in cs),
            reconnects=sum(c.connection.reconnects for c in cs),
            committed_candles=sum(c.committed for c in cs),
            held_candles=sum(c.held for c in cs),
            loops_enable_pipeline_publish=tuple(c.enable_pipeline_publish for c in cs),
        )
