"""Binance WS ingest: IngestSupervisor and run_binance_ws_ingest_loop (DESIGN §4).

Task tree of one loop (one per Binance connection of at most 200 streams)::

    run_binance_ws_ingest_loop            state: a SeriesTracker per series, the batcher
    ├─ connections   connect / reconnect with backoff / rotate make-before-break
    │  └─ reader (one per open socket)   get_message → frames channel; stale → replace
    ├─ processor     frames channel → decode → forming (throttled → hub, never stored)
    │                                         closed → SeriesTracker → batcher
    ├─ fills         SeriesTracker.next_fill → REST klines (own tasks) → batcher
    └─ committer     batcher → IngestPipeline.run → _publish_pipeline_result_from_ws

Channel contract: the readers put frames on ``frames`` (bounded, FRAME_BUFFER). The
processor is the only consumer and never awaits anything but that channel — the store,
REST and subscribers are only reached from the committer and fill tasks — so a reader waits
only while the processor is busy with CPU work, and trio-websocket keeps answering pings.

Shutdown: cancel the loop (or the supervisor). The loop's ``finally`` then, shielded and
bounded by ``IngestPolicy.flush_deadline_s``, processes the frames already received,
releases held candles and commits and publishes everything still buffered — SIGTERM
"flushes and commits pending closed candles". A hole under a held candle that REST had not
filled yet stays a hole in the store.

Raises StoreError (the daemon stops); everything else a loop raises makes the supervisor
restart it after a backoff.
"""

from __future__ import annotations

import functools
import itertools
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Final, final

import attrs
import trio
import trio_websocket

from tradecanvas.errors import (
    CandleError,
    PublishError,
    StoreError,
    UpstreamError,
    WireError,
    find_in_group,
)
from tradecanvas.ingest.batcher import (
    BatchItem,
    ClosedBatcher,
    FillRequest,
    FormingThrottle,
    IngestSource,
    MinuteCache,
    Released,
    SeriesTracker,
)
from tradecanvas.model import MINUTE, MINUTE_MS, MS, Candle, Market, SeriesId, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline import (
    IngestBatch,
    IngestPipeline,
    MarketSink,
    PipelineResult,
    PublishStep,
    run_publish_steps,
)
from tradecanvas.pipeline.derive import derive_forming
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.records import StoreBanMemory, StoreHoleMemory
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.upstream.rest import BinanceRestClient, RestPolicy, open_rest_client
from tradecanvas.upstream.ws_client import open_websocket_client
from tradecanvas.wire.binance import ControlFrame, KlineEvent, decode_frame

log = logging.getLogger(__name__)

MAX_STREAMS_PER_CONNECTION: Final = 200  # BINANCE.md: futures docs disagree, 200 is safe
# Frames between a reader and the processor. Futures push each stream every 250 ms, so
# 200 streams are 800 frames/s: this is about five seconds of the busiest connection,
# far more than the processor (pure CPU, microseconds per frame) ever falls behind.
FRAME_BUFFER: Final = 4096
# REST fills of one loop running at once; the REST client paces per host on top of this
FILL_CONCURRENCY: Final = 4


def build_combined_stream_url(base_url: str, streams: Sequence[str]) -> str:
    """``{base}/stream?streams=a/b``. ``http(s)://`` bases become ``ws(s)://``; the
    futures base keeps its ``/market`` route (without it Binance sends no klines)."""
    if not streams:
        raise ValueError("no streams to subscribe to")
    if len(streams) > MAX_STREAMS_PER_CONNECTION:
        raise ValueError(
            f"{len(streams)} streams on one connection; at most {MAX_STREAMS_PER_CONNECTION}"
        )
    base = base_url.strip().rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    if not base.startswith(("ws://", "wss://")):
        raise ValueError(f"{base_url!r} is not a ws://, wss://, http:// or https:// URL")
    return f"{base}/stream?streams={'/'.join(streams)}"


def reconnect_reason(ended: bool, end_reason: str, *, shutdown_announced: bool = False) -> str:
    """The ``reason`` label of ``tradecanvas_upstream_reconnects_total``."""
    if shutdown_announced:
        return "server_shutdown"  # whether Binance closed before we rotated or not
    if ended:
        return "stale" if end_reason.startswith("stale") else "dropped"
    return "rotation"


def failures_after_end(
    failures: int, *, lived_s: float, healthy_after_s: float, shutdown_announced: bool
) -> int:
    """The reconnect backoff step after a connection ended (0: reconnect at once).

    A healthy connection (one that lived ``healthy_after_s``) restarts the backoff: at once
    when Binance announced the close (serverShutdown), else after one small jittered step.
    A short-lived one backs off further, announced or not, so an endpoint that announces a
    shutdown right after every connect cannot drive us into its connection-rate limit.
    """
    if lived_s >= healthy_after_s:
        return 0 if shutdown_announced else 1
    return failures + 1


def ws_base_url(flags: RuntimeFlags, market: Market) -> str:
    return flags.binance_futures_ws_url if market == "futures" else flags.binance_spot_ws_url


def connection_groups(series: Iterable[SeriesId]) -> list[tuple[SeriesId, ...]]:
    """The configured series split into connections: per market, at most 200 streams each,
    in configured order."""
    by_market: dict[Market, list[SeriesId]] = {}
    for sid in series:
        by_market.setdefault(sid.market, []).append(sid)
    groups: list[tuple[SeriesId, ...]] = []
    for items in by_market.values():
        for i in range(0, len(items), MAX_STREAMS_PER_CONNECTION):
            groups.append(tuple(items[i : i + MAX_STREAMS_PER_CONNECTION]))
    return groups


@attrs.frozen
class IngestPolicy:
    """Timing constants of the ingest loop (wall-clock timeouts only; never exchange time).

    Not flags: they follow Binance's connection rules. Tests pass smaller values.
    """

    reconnect_base_s: float = 1.0
    reconnect_cap_s: float = 60.0
    healthy_after_s: float = 60.0  # a connection that lived this long resets the backoff
    min_connect_interval_s: float = 1.0  # BINANCE.md: pace connects >= 1 s apart
    connect_timeout_s: float = 10.0
    disconnect_timeout_s: float = 2.0
    rotate_after_s: float = 23.5 * 3600  # before Binance's 24 h cut
    overlap_max_s: float = 10.0  # make-before-break: wait this long for the new first frame
    fill_retry_base_s: float = 1.0
    fill_retry_cap_s: float = 60.0
    hold_max_s: float = 120.0  # held candles wait this long for a REST fill that keeps failing
    flush_deadline_s: float = 5.0  # the shutdown flush
    restart_base_s: float = 1.0  # supervisor: a crashed loop restarts after this (doubling)
    restart_cap_s: float = 60.0
    # closed candles waiting for a commit plus the minutes of the REST fills in flight; no
    # fill starts while they reach this, so a slow disk bounds the candles in memory at
    # this plus one fill chunk (FILL_CHUNK_MINUTES)
    backlog_max: int = 50_000

    @property
    def reconnect_backoff(self) -> Backoff:
        return Backoff(self.reconnect_base_s, self.reconnect_cap_s)

    @property
    def fill_backoff(self) -> Backoff:
        return Backoff(self.fill_retry_base_s, self.fill_retry_cap_s)

    @property
    def restart_backoff(self) -> Backoff:
        return Backoff(self.restart_base_s, self.restart_cap_s)


@attrs.define
class LoopCounters:
    """Live counters of one loop, read by IngestSupervisor.statistics()."""

    streams: int = 0
    enable_pipeline_publish: bool | None = None  # the kill-switch value the loop runs with
    connected: int = 0
    reconnects: int = 0
    rotations: int = 0
    stale_replacements: int = 0
    connect_failures: int = 0
    frames: int = 0
    malformed: int = 0
    acks: int = 0
    ignored: int = 0
    duplicates: int = 0
    backfilled: int = 0
    late_repaired: int = 0
    held: int = 0
    absent: int = 0
    fills_deferred: int = 0  # REST fills put off by a full commit backlog (once per wait)
    committed: int = 0
    publishes: int = 0
    publish_failures: int = 0
    last_event_time_ms: dict[str, int] = attrs.Factory(dict)


@attrs.frozen
class IngestStatistics:
    """A snapshot of the supervisor (frozen)."""

    streams: int
    connections: int  # configured connections (groups of at most 200 streams)
    connected: int  # sockets open now
    reconnects: int
    rotations: int
    stale_replacements: int
    loop_restarts: int
    frames: int
    malformed_frames: int
    duplicates_dropped: int
    backfilled_candles: int
    late_closes_repaired: int
    held_candles: int
    exchange_missing_minutes: int  # confirmed missing at the exchange by REST
    fills_deferred: int  # REST fills put off by IngestPolicy.backlog_max (once per wait)
    committed_candles: int
    publishes: int
    publish_failures: int
    last_frame_time_ms: Mapping[str, int]  # per stream: the last frame's event time E
    enable_pipeline_publish: bool  # the value the supervisor was given
    # the value each run_binance_ws_ingest_loop received (None: not started yet)
    loops_enable_pipeline_publish: tuple[bool | None, ...]


def _publish_pipeline_result_from_ws(
    result: PipelineResult,
    *,
    pipeline: IngestPipeline,
    hub: MarketSink,
    metrics: Metrics,
    enable_pipeline_publish: bool,
) -> int:
    """Publish one committed WS batch by the path the kill-switch chooses; returns the
    number of failed steps.

    ``True`` (pipeline): ``IngestPipeline.publish(result, best_effort=True)``.
    ``False`` (legacy): base series first, strict — a failing base step raises
    PublishError, after the remaining steps have run; then derived series in configured
    order and the system events, base first, each best-effort. Both send the same
    messages; one ``publish_total`` count per call.
    """
    if enable_pipeline_publish:
        metrics.publish_total.labels(path="pipeline").inc()
        failed = pipeline.publish(result, best_effort=True)
        if failed:
            metrics.publish_failed_steps_total.labels(path="pipeline").inc(failed)
        return failed
    metrics.publish_total.labels(path="legacy").inc()
    steps = [
        PublishStep(
            f"closed {update.series_id}",
            functools.partial(hub.publish_closed, update.series_id, update.candles),
            strict=not update.derived,
        )
        for update in result.in_legacy_order()
    ]
    steps += [
        PublishStep(f"system {event.series_id}", functools.partial(hub.publish_system, event))
        for event in result.events_base_first()
    ]
    outcome = run_publish_steps(steps)
    if outcome.failed:
        metrics.publish_failed_steps_total.labels(path="legacy").inc(outcome.failed)
    # strict for the base series, but raised only after every other step ran
    outcome.raise_if_strict_failed()
    return outcome.failed


class _Wakeup:
    """A level-triggered wake-up for one waiting task: the waiter re-checks its state after
    every wake, so a ``set()`` that lands while it is busy is never lost."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


@attrs.define(eq=False)
class _Connection:
    generation: int
    cancel_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    first_frame: trio.Event = attrs.Factory(trio.Event)
    replace_wanted: trio.Event = attrs.Factory(trio.Event)
    ended: trio.Event = attrs.Factory(trio.Event)
    connected_at: float = 0.0
    end_reason: str = ""
    shutdown_announced: bool = False  # Binance sent serverShutdown on this connection


@attrs.frozen
class _Frame:
    generation: int
    raw: str | bytes
    received_at: float


_CONNECT_ERRORS: Final = (trio_websocket.HandshakeError, OSError)


def _mentions_server_shutdown(message: str | bytes) -> bool:
    """A cheap pre-check the reader runs on every frame (a substring search; no decode)."""
    if isinstance(message, str):
        return "serverShutdown" in message
    return b"serverShutdown" in message


@final
class _IngestLoop:
    """The state and tasks of one run_binance_ws_ingest_loop call."""

    def __init__(
        self,
        series: Sequence[SeriesId],
        *,
        flags: RuntimeFlags,
        rest: BinanceRestClient,
        pipeline: IngestPipeline,
        hub: MarketSink,
        metrics: Metrics,
        enable_pipeline_publish: bool,
        policy: IngestPolicy,
        counters: LoopCounters,
    ) -> None:
        markets = {s.market for s in series}
        if len(markets) != 1:
            raise ValueError(f"one loop serves one market, got {sorted(markets)}")
        for sid in series:
            if sid.timeframe.seconds != MINUTE:
                raise ValueError(f"{sid}: only 1m series are ingested")
        self.series = tuple(series)
        self.flags = flags
        self.rest = rest
        self.pipeline = pipeline
        self.hub = hub
        self.metrics = metrics
        self.enable_pipeline_publish = enable_pipeline_publish
        self.policy = policy
        self.counters = counters
        counters.streams = len(series)
        counters.enable_pipeline_publish = enable_pipeline_publish
        self.url = build_combined_stream_url(
            ws_base_url(flags, self.series[0].market), [s.stream_name for s in self.series]
        )
        self.streams = {s.stream_name: s for s in self.series}
        self.derived: tuple[Timeframe, ...] = tuple(flags.derived_timeframes)
        self.trackers: dict[SeriesId, SeriesTracker] = {}
        self.holes = StoreHoleMemory(pipeline.store)
        self.batcher = ClosedBatcher(flags.binance_ws_batch_max, flags.binance_ws_flush_s)
        self.throttle: FormingThrottle[SeriesId] = FormingThrottle(
            flags.market_forming_min_interval_ms / MS
        )
        span = max((tf.seconds for tf in self.derived), default=MINUTE) + MINUTE
        self.minutes = MinuteCache(span)
        self._late_close_ms = round(flags.late_close_s * MS)
        self._frames_send, self._frames_recv = trio.open_memory_channel[_Frame](FRAME_BUFFER)
        self._batch_wakeup = _Wakeup()
        self._fill_wakeup = _Wakeup()
        self._fill_limiter = trio.CapacityLimiter(FILL_CONCURRENCY)
        self._fill_minutes_in_flight = 0
        self._generations = itertools.count(1)
        self._connections: dict[int, _Connection] = {}
        self._seen_generation: dict[SeriesId, int] = {}
        self._exchange_minute = -1  # (E - late_close) // 60 s last applied to the trackers
        self._exchange_time_ms = 0
        self._logged_kinds: set[str] = set()
        self._fatal: StoreError | None = None

    # --- lifetime ----------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        await self._load_state()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._process_frames)
                nursery.start_soon(self._commit_batches, nursery.cancel_scope)
                nursery.start_soon(self._run_fills)
                nursery.start_soon(self._maintain_connections)
                task_status.started()
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.policy.flush_deadline_s
                await self._final_flush()
            self.counters.connected = 0
        if self._fatal is not None:
            raise self._fatal

    async def _load_state(self) -> None:
        """Heads, unresolved holes and the recent minutes from the store (before any frame
        is read)."""
        span = self.minutes.span_s
        for sid in self.series:
            head = await self.pipeline.store.head_time(str(sid))
            unresolved = await self.holes.load(sid)
            if unresolved:
                log.info("%s: %d unresolved holes from before; retrying", sid, len(unresolved))
            self.trackers[sid] = SeriesTracker(
                head=head,
                initial_backfill=self.flags.initial_backfill_candles,
                late_close_ms=self._late_close_ms,
                unresolved=unresolved,
            )
            if head is not None:
                stored = await self.pipeline.store.range(str(sid), head - span, head + MINUTE)
                self.minutes.add(sid, [s.candle for s in stored])

    async def _final_flush(self) -> None:
        try:
            while True:
                try:
                    frame = self._frames_recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                self._handle_frame(frame)
            now = trio.current_time()
            for sid, tracker in self.trackers.items():
                self.batcher.add(sid, tracker.release_held(), now, tracker.unresolved)
            self._sync_tracker_counters()
            while len(self.batcher) and self._fatal is None:
                await self._commit_once()
            for sid in self.trackers:
                await self._save_holes_if_idle(sid)
        except StoreError as exc:
            self._fatal = exc
            log.error("shutdown flush failed: %s", exc)
        except Exception:
            log.exception("shutdown flush failed")
        if len(self.batcher):
            log.error("%d closed candles were not committed at shutdown", len(self.batcher))

    # --- connections -------------------------------------------------------------------

    async def _maintain_connections(self) -> None:
        policy = self.policy
        async with trio.open_nursery() as nursery:
            failures = 0
            last_attempt = -math.inf
            previous: _Connection | None = None
            while True:
                delay = policy.reconnect_backoff.delay(failures) if failures else 0.0
                delay = max(
                    delay, last_attempt + policy.min_connect_interval_s - trio.current_time()
                )
                if delay > 0:
                    await trio.sleep(delay)
                if previous is not None and previous.ended.is_set():
                    previous = None
                last_attempt = trio.current_time()
                conn = _Connection(next(self._generations))
                try:
                    await nursery.start(self._run_connection, conn)
                except _CONNECT_ERRORS as exc:
                    failures += 1
                    self.counters.connect_failures += 1
                    log.warning("%s: connect failed (%s): %s", self._name, failures, exc)
                    continue
                if previous is not None:
                    with trio.move_on_after(policy.overlap_max_s):
                        await conn.first_frame.wait()
                    previous.cancel_scope.cancel()
                    previous = None
                with trio.move_on_after(policy.rotate_after_s):
                    await conn.replace_wanted.wait()
                self.counters.reconnects += 1
                self.metrics.upstream_reconnects_total.labels(
                    reason=reconnect_reason(
                        conn.ended.is_set(),
                        conn.end_reason,
                        shutdown_announced=conn.shutdown_announced,
                    )
                ).inc()
                if conn.ended.is_set():
                    failures = failures_after_end(
                        failures,
                        lived_s=trio.current_time() - conn.connected_at,
                        healthy_after_s=policy.healthy_after_s,
                        shutdown_announced=conn.shutdown_announced,
                    )
                    if conn.shutdown_announced:
                        log.info("%s: closed after serverShutdown; reconnecting", self._name)
                    else:
                        log.warning(
                            "%s: connection ended (%s); reconnecting", self._name, conn.end_reason
                        )
                else:
                    # Binance's 24 h cut is near, or it announced serverShutdown: open the
                    # new connection first and close this one once the new one delivers
                    self.counters.rotations += 1
                    failures = 0
                    previous = conn
                    log.info(
                        "%s: rotating the connection (%s)", self._name, conn.end_reason or "age"
                    )

    @property
    def _name(self) -> str:
        return f"binance {self.series[0].market} ({len(self.series)} streams)"

    async def _run_connection(
        self, conn: _Connection, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        started = False
        try:
            async with open_websocket_client(
                self.url,
                connect_timeout=self.policy.connect_timeout_s,
                disconnect_timeout=self.policy.disconnect_timeout_s,
            ) as ws:
                started = True
                conn.connected_at = trio.current_time()
                self._connections[conn.generation] = conn
                self.counters.connected = len(self._connections)
                task_status.started()
                with conn.cancel_scope:
                    conn.end_reason = await self._read_frames(ws, conn)
        except Exception as exc:
            if not started:
                raise
            conn.end_reason = f"{type(exc).__name__}: {exc}"
        finally:
            self._connections.pop(conn.generation, None)
            self.counters.connected = len(self._connections)
            conn.ended.set()
            conn.replace_wanted.set()

    async def _read_frames(self, ws: trio_websocket.WebSocketConnection, conn: _Connection) -> str:
        """Read until the connection closes or goes stale. Never waits on anything but the
        frames channel (see the module docstring)."""
        stale_s = self.flags.stale_timeout_s
        # one scope whose deadline moves with every frame (cheaper than one per frame);
        # only the wait for Binance counts, never the wait for the processor
        with trio.CancelScope() as scope:
            while True:
                scope.deadline = trio.current_time() + stale_s
                try:
                    message = await ws.get_message()
                except trio_websocket.ConnectionClosed as exc:
                    return f"closed by Binance: {exc.reason}"
                scope.deadline = math.inf
                conn.first_frame.set()
                if _mentions_server_shutdown(message):
                    self._note_server_shutdown(conn, message)
                await self._frames_send.send(_Frame(conn.generation, message, trio.current_time()))
        self.counters.stale_replacements += 1
        return f"stale: no frame for {stale_s:g} s"

    def _note_server_shutdown(self, conn: _Connection, message: str | bytes) -> None:
        """Seen by the reader itself, not after the frame queue: Binance may close the
        connection right after it, before the processor reaches the frame."""
        try:
            decoded = decode_frame(message)
        except WireError:
            return  # the processor counts it as malformed
        if isinstance(decoded, ControlFrame) and decoded.kind == "server_shutdown":
            if not conn.shutdown_announced:
                log.info("%s: Binance announced serverShutdown", self._name)
            conn.shutdown_announced = True
            conn.end_reason = "serverShutdown"
            conn.replace_wanted.set()

    # --- processing (sync per frame) ---------------------------------------------------

    async def _process_frames(self) -> None:
        while True:
            due = self.throttle.next_due()
            with trio.move_on_at(due if due is not None else math.inf):
                frame = await self._frames_recv.receive()
                self._handle_frame(frame)
            now = trio.current_time()
            for sid, candle in self.throttle.due(now):
                self._emit_forming(sid, candle)

    def _malformed(self, reason: str, detail: str) -> None:
        self.counters.malformed += 1
        self.metrics.malformed_frames_total.labels(reason=reason).inc()
        if reason not in self._logged_kinds:
            self._logged_kinds.add(reason)
            log.warning("%s: dropped a malformed frame (%s): %s", self._name, reason, detail[:300])

    def _handle_frame(self, frame: _Frame) -> None:
        self.counters.frames += 1
        try:
            decoded = decode_frame(frame.raw)
        except WireError as exc:
            self._malformed(exc.reason, exc.detail)
            return
        if isinstance(decoded, ControlFrame):
            self._handle_control(decoded)
            return
        sid = self.streams.get(decoded.stream_name)
        if sid is None or decoded.kline.interval != sid.timeframe.text:
            self._malformed("unknown_stream", decoded.stream_name)
            return
        self._handle_kline(sid, decoded, frame)

    def _handle_control(self, control: ControlFrame) -> None:
        # serverShutdown was acted on by the reader already (_note_server_shutdown)
        if control.kind == "ack":
            self.counters.acks += 1
        elif control.kind != "server_shutdown":
            self.counters.ignored += 1

    def _handle_kline(self, sid: SeriesId, event: KlineEvent, frame: _Frame) -> None:
        tracker = self.trackers[sid]
        kline = event.kline
        candle = kline.to_candle()
        self.counters.last_event_time_ms[sid.stream_name] = event.event_time_ms
        new_connection = self._seen_generation.get(sid, 0) < frame.generation
        if new_connection:
            self._seen_generation[sid] = frame.generation
        had_head = tracker.head is not None
        tracker.on_live_frame(candle.candle_time, new_connection=new_connection)
        wake_fills = new_connection or not had_head
        self._advance_exchange_time(event.event_time_ms)
        if kline.closed:
            self.throttle.discard(sid, candle.candle_time)
            before = tracker.counters.duplicates
            released = tracker.on_closed(
                candle, now=frame.received_at, source="ws", received_at=frame.received_at
            )
            self._enqueue(sid, released)
            if tracker.held_count():
                wake_fills = True
            self.counters.duplicates += tracker.counters.duplicates - before
        else:
            head = tracker.head
            if head is None or candle.candle_time > head:
                emit = self.throttle.offer(sid, candle, frame.received_at)
                if emit is not None:
                    self._emit_forming(sid, emit)
        if wake_fills:
            self._fill_wakeup.set()

    def _advance_exchange_time(self, event_time_ms: int) -> None:
        """Exchange time is one clock for the whole connection: a quiet symbol's late close
        is noticed from the other streams' frames."""
        self._exchange_time_ms = max(self._exchange_time_ms, event_time_ms)
        minute = (self._exchange_time_ms - self._late_close_ms) // MINUTE_MS
        if minute > self._exchange_minute:
            self._exchange_minute = minute
            for tracker in self.trackers.values():
                tracker.on_exchange_time(self._exchange_time_ms)
            self._fill_wakeup.set()

    def _enqueue(
        self,
        sid: SeriesId,
        released: Sequence[Released],
        *,
        holes_until_last: tuple[tuple[int, int], ...] | None = None,
    ) -> None:
        """Queue ``released`` for commit with the series' unresolved holes to store with
        them; ``holes_until_last``: what to keep stored until the last of them commits (the
        holes before a retry, which its candles fill)."""
        if not released:
            return
        # forming derived candles need these minutes now, not after the batch is flushed
        # (else a 5m forming bar's volume dips for up to binance_ws_flush_s)
        self.minutes.add(sid, [r.candle for r in released])
        now = trio.current_time()
        holes = self.trackers[sid].unresolved
        if holes_until_last is not None and len(released) > 1:
            self.batcher.add(sid, released[:-1], now, holes_until_last)
            released = released[-1:]
        self.batcher.add(sid, released, now, holes)
        self._batch_wakeup.set()

    async def _save_holes_if_idle(self, sid: SeriesId) -> None:
        """Store the series' unresolved holes now if no queued candle will carry them (a
        retry that found every minute absent at the exchange)."""
        if self.batcher.holds(sid):
            return
        try:
            await self.holes.save(sid, self.trackers[sid].unresolved)
        except StoreError as exc:
            # harmless: what is stored lists more holes than there are, and a retry of
            # those after a restart stores nothing
            log.warning("%s: could not save the unresolved holes: %s", sid, exc)

    def _emit_forming(self, sid: SeriesId, candle: Candle) -> None:
        """Forming base and derived candles to the hub (only queued; never stored)."""
        try:
            self.hub.publish_forming(str(sid), candle)
            for tf in self.derived:
                minutes, previous_close = self.minutes.bucket(sid, tf, candle.candle_time)
                derived = derive_forming(tf, minutes, candle, previous_close)
                if derived is not None:
                    self.hub.publish_forming(str(sid.with_timeframe(tf)), derived)
        except Exception:
            if "forming_publish" not in self._logged_kinds:
                self._logged_kinds.add("forming_publish")
                log.exception("%s: forming publish failed (logged once)", self._name)

    # --- REST fills ----------------------------------------------------------------------

    def _backlogged(self) -> bool:
        """Closed candles waiting for a commit, plus the minutes of the fills in flight,
        have reached IngestPolicy.backlog_max."""
        return len(self.batcher) + self._fill_minutes_in_flight >= self.policy.backlog_max

    async def _run_fills(self) -> None:
        deferred: set[SeriesId] = set()  # put off by the backlog since their last fill
        async with trio.open_nursery() as nursery:
            while True:
                now = trio.current_time()
                wake_at = math.inf
                for sid, tracker in self.trackers.items():
                    # backlogged: commits wake this loop up as they drain the batcher
                    backlogged = self._backlogged()
                    request = None if backlogged else tracker.next_fill(now)
                    if request is not None:
                        deferred.discard(sid)
                        self._fill_minutes_in_flight += request.minutes
                        nursery.start_soon(self._fill, sid, request)
                    elif tracker.wants_fill():
                        if not backlogged:
                            wake_at = min(wake_at, tracker.retry_at)
                        elif sid not in deferred:
                            deferred.add(sid)
                            self.counters.fills_deferred += 1
                    else:
                        deferred.discard(sid)  # a later backlog is a new deferral
                    if tracker.held_since is not None and tracker.failures:
                        release_at = tracker.held_since + self.policy.hold_max_s
                        if now >= release_at:
                            log.error(
                                "%s: REST keeps failing; committing %d held candles above a"
                                " hole (retried later)",
                                sid,
                                tracker.held_count(),
                            )
                            self._enqueue(sid, tracker.release_held())
                        else:
                            wake_at = min(wake_at, release_at)
                self._sync_tracker_counters()
                with trio.move_on_at(wake_at):
                    await self._fill_wakeup.wait()

    async def _fill(self, sid: SeriesId, request: FillRequest) -> None:
        try:
            await self._fill_once(sid, request)
        finally:
            self._fill_minutes_in_flight -= request.minutes
            self._fill_wakeup.set()

    async def _fill_once(self, sid: SeriesId, request: FillRequest) -> None:
        tracker = self.trackers[sid]
        try:
            async with self._fill_limiter:
                candles = await self.rest.klines(sid, request.start, request.end)
        except (UpstreamError, WireError) as exc:
            delay = self.policy.fill_backoff.delay(tracker.failures + 1)
            tracker.on_fill_failed(request, trio.current_time(), max(delay, 0.1))
            log.warning("%s: REST fill %s failed: %s", sid, request, exc)
        else:
            absent_before = tracker.counters.absent_minutes
            holes_before = tracker.unresolved
            released = tracker.on_fill_result(request, candles, now=trio.current_time())
            absent = tracker.counters.absent_minutes - absent_before
            if absent:
                self.metrics.exchange_missing_minutes_total.inc(absent)
                log.warning(
                    "%s: %d minute(s) in %d..%d are missing at the exchange (a gap)",
                    sid,
                    absent,
                    request.start,
                    request.end,
                )
            if request.reason in ("initial", "reconnect", "retry"):
                log.info(
                    "%s: %s backfill %d..%d: %d candles",
                    sid,
                    request.reason,
                    request.start,
                    request.end,
                    len(candles),
                )
            self.metrics.backfill_candles_total.inc(sum(r.source == "rest" for r in released))
            self.metrics.late_closes_repaired_total.inc(
                sum(r.reason in ("late_close", "hole") for r in released)
            )
            if request.reason == "retry":
                self.batcher.forget_holes(sid, tracker.last_absent)
                self._enqueue(sid, released, holes_until_last=holes_before)
                await self._save_holes_if_idle(sid)
            else:
                self._enqueue(sid, released)
        self._sync_tracker_counters()

    def _sync_tracker_counters(self) -> None:
        self.counters.backfilled = sum(t.counters.rest_released for t in self.trackers.values())
        self.counters.late_repaired = sum(t.counters.repaired for t in self.trackers.values())
        self.counters.held = sum(t.held_count() for t in self.trackers.values())
        self.counters.absent = sum(t.counters.absent_minutes for t in self.trackers.values())

    # --- commit and publish ------------------------------------------------------------

    async def _commit_batches(self, loop_scope: trio.CancelScope) -> None:
        while True:
            due = self.batcher.due_at()
            if due is None:
                await self._batch_wakeup.wait()
                continue
            if due > trio.current_time():
                with trio.move_on_at(due):
                    await self._batch_wakeup.wait()
                continue
            try:
                await self._commit_once()
            except StoreError as exc:
                self._fatal = exc
                loop_scope.cancel()
                return

    async def _run_batch(self, items: Sequence[BatchItem], source: IngestSource) -> PipelineResult:
        """Commit ``items`` with the unresolved-hole records they carry, in one transaction."""
        holes: dict[SeriesId, tuple[tuple[int, int], ...]] = {}
        for item in items:
            if item.holes is not None:
                holes[item.series] = item.holes  # the last one of each series counts
        meta = tuple(
            entry
            for sid, value in holes.items()
            if (entry := self.holes.record(sid, value)) is not None
        )
        batch = IngestBatch(tuple((i.series, i.released.candle) for i in items), source, meta)
        result = await self.pipeline.run(batch)
        for sid, value in holes.items():
            self.holes.committed(sid, value)
        return result

    async def _commit_once(self) -> None:
        backlogged = self._backlogged()
        items = self.batcher.take()
        if not items:
            return
        if backlogged:
            self._fill_wakeup.set()  # fills paused for the backlog may go on after this
        started = trio.current_time()
        result = await self._run_pipeline(items)
        if result is None:
            return
        committed_at = trio.current_time()
        for sid in {item.series for item in items}:
            self.minutes.add(sid, [i.released.candle for i in items if i.series == sid])
        self.counters.committed += result.committed
        self.metrics.candles_committed_total.inc(result.committed)
        if result.committed or result.events:
            self.counters.publishes += 1
            try:
                failed = _publish_pipeline_result_from_ws(
                    result,
                    pipeline=self.pipeline,
                    hub=self.hub,
                    metrics=self.metrics,
                    enable_pipeline_publish=self.enable_pipeline_publish,
                )
            except PublishError as exc:
                # a subscriber failed (already isolated by the hub); the candles are
                # committed and healthy subscribers heal from the store. Never a reason
                # to touch the upstream connection.
                self.counters.publish_failures += 1
                log.warning("%s: legacy publish failed: %s", self._name, exc)
            else:
                self.counters.publish_failures += 1 if failed else 0
        now = trio.current_time()
        for item in items:
            if item.released.received_at is not None:
                self.metrics.ingest_latency_seconds.observe(now - item.released.received_at)
        log.info(
            "%s: flush %d received, %d committed, %d duplicates, %d events;"
            " commit %.1f ms, publish %.1f ms (%s)",
            self._name,
            result.received,
            result.committed,
            result.duplicates_dropped,
            len(result.events),
            (committed_at - started) * 1e3,
            (now - committed_at) * 1e3,
            "pipeline" if self.enable_pipeline_publish else "legacy",
        )

    async def _run_pipeline(self, items: Sequence[BatchItem]) -> PipelineResult | None:
        source = items[0].released.source
        try:
            return await self._run_batch(items, source)
        except CandleError as exc:
            # decode already validated every candle; if one still fails, commit the rest
            log.error("%s: a batch was refused (%s); committing candle by candle", self._name, exc)
        results: list[PipelineResult] = []
        for item in items:
            try:
                results.append(await self._run_batch([item], source))
            except CandleError as exc:
                self._malformed("bad_candle", str(exc))
        if not results:
            return None
        return PipelineResult(
            updates=tuple(u for r in results for u in r.updates),
            events=tuple(e for r in results for e in r.events),
            received=sum(r.received for r in results),
            duplicates_dropped=sum(r.duplicates_dropped for r in results),
        )


async def run_binance_ws_ingest_loop(
    series: Sequence[SeriesId],
    *,
    flags: RuntimeFlags,
    rest: BinanceRestClient,
    pipeline: IngestPipeline,
    hub: MarketSink,
    metrics: Metrics,
    enable_pipeline_publish: bool,
    policy: IngestPolicy | None = None,
    counters: LoopCounters | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ingest ``series`` (one market, at most 200) over one Binance combined-stream
    connection until cancelled: reconnecting, backfilling from REST, batching closed klines
    into ``pipeline`` and publishing them by the path ``enable_pipeline_publish`` chooses
    (the kill-switch; recorded in ``counters.enable_pipeline_publish``).

    ``started()`` once the store heads are loaded and the tasks run (not yet connected).
    On cancellation, pending closed candles are committed (shielded, bounded). Raises
    StoreError; any other exception is a bug the supervisor restarts the loop for.
    """
    loop = _IngestLoop(
        series,
        flags=flags,
        rest=rest,
        pipeline=pipeline,
        hub=hub,
        metrics=metrics,
        enable_pipeline_publish=enable_pipeline_publish,
        policy=policy or IngestPolicy(),
        counters=counters if counters is not None else LoopCounters(),
    )
    await loop.run(task_status)


@final
class IngestSupervisor:
    """Owns the Binance connections of ``flags.series``: one run_binance_ws_ingest_loop per
    connection of at most 200 streams per market, and the shared httpx client.

    A loop that crashes is restarted after a capped, jittered backoff; a crash never takes
    the daemon down — except StoreError, which :meth:`run` raises (the store is gone).
    Cancel :meth:`run` to stop: every loop commits its pending closed candles first.
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
        self._restarts = 0
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
                )
            except StoreError as exc:
                log.critical("the candle store failed; stopping the ingest: %s", exc)
                self._fatal = exc
                scope.cancel()
                return
            except Exception as exc:
                store_error = find_in_group(exc, StoreError)
                if store_error is not None:
                    # a store failure inside one of the loop's own nurseries is fatal too
                    log.critical("the candle store failed; stopping the ingest: %s", store_error)
                    self._fatal = store_error
                    scope.cancel()
                    return
                log.exception("ingest loop for %s crashed; restarting", [str(s) for s in group])
            else:
                log.error("ingest loop for %s returned; restarting", [str(s) for s in group])
            self._restarts += 1
            ran = trio.current_time() - started_at
            crashes = 1 if ran >= self.policy.healthy_after_s else crashes + 1
            await trio.sleep(self.policy.restart_backoff.delay(crashes))

    def upstream_connected(self) -> bool:
        """True when every connection has an open socket (for /readyz)."""
        return bool(self._counters) and all(c.connected > 0 for c in self._counters)

    def statistics(self) -> IngestStatistics:
        cs = self._counters
        last: dict[str, int] = {}
        for c in cs:
            last.update(c.last_event_time_ms)
        return IngestStatistics(
            streams=sum(c.streams for c in cs),
            connections=len(cs),
            connected=sum(c.connected for c in cs),
            reconnects=sum(c.reconnects for c in cs),
            rotations=sum(c.rotations for c in cs),
            stale_replacements=sum(c.stale_replacements for c in cs),
            loop_restarts=self._restarts,
            frames=sum(c.frames for c in cs),
            malformed_frames=sum(c.malformed for c in cs),
            duplicates_dropped=sum(c.duplicates for c in cs),
            backfilled_candles=sum(c.backfilled for c in cs),
            late_closes_repaired=sum(c.late_repaired for c in cs),
            held_candles=sum(c.held for c in cs),
            exchange_missing_minutes=sum(c.absent for c in cs),
            fills_deferred=sum(c.fills_deferred for c in cs),
            committed_candles=sum(c.committed for c in cs),
            publishes=sum(c.publishes for c in cs),
            publish_failures=sum(c.publish_failures for c in cs),
            last_frame_time_ms=last,
            enable_pipeline_publish=self.enable_pipeline_publish,
            loops_enable_pipeline_publish=tuple(c.enable_pipeline_publish for c in cs),
        )
