"""run_binance_ws_ingest_loop: the trio shell around IngestCore (DESIGN §4).

Task tree of one loop (one per Binance connection of at most 200 streams)::

    run_binance_ws_ingest_loop            IngestCore: a SeriesTracker per series, the batcher
    ├─ connections   upstream.binance_ws: connect / reconnect / rotate make-before-break
    │  └─ reader (one per open socket)   get_message → frames channel; stale → replace
    ├─ processor     frames channel → IngestCore.on_frame → forming → hub (never stored)
    │                                                       closed → the core's batcher
    │                (a run of closes at or below a head: a WARNING a minute, behind_head)
    ├─ forming timer IngestCore.due_forming: throttled forming updates whose time came → hub
    ├─ fills         IngestCore.next_fills → REST klines (own tasks) → on_fill_result
    ├─ history       another process's factor.rebuild (import, backfill) → the minutes its
    │                range touches, read back → the core's minute cache (history_refresh)
    └─ committer     IngestCore.take_batch → BatchCommitter: IngestPipeline.run → publish
                     → IngestCore.on_committed → the forming candles it held → hub

Every decision is the core's; this module owns the tasks, the channel, the clock, the
metrics, the logs and the REST calls (the store and the hub: BatchCommitter).

Channel contract: the readers put frames on ``frames`` in bursts (bounded, FRAME_BUFFER). The
processor is the only consumer and never awaits anything but that channel — the store,
REST and subscribers are only reached from the committer and fill tasks — so a reader waits
only while the processor is busy with CPU work, and trio-websocket keeps answering pings.

Shutdown: cancel the loop (or the supervisor). The loop's ``finally`` then, shielded and
bounded by ``IngestPolicy.flush_deadline_s``, processes the frames already received,
releases held candles and commits and publishes everything still buffered — SIGTERM
"flushes and commits pending closed candles". A hole under a held candle that REST had not
filled yet stays a hole in the store (and is retried after the restart).

Raises StoreError (the daemon stops); everything else a loop raises makes the supervisor
restart it after a backoff.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Final, final

import attrs
import trio

from tradecanvas.errors import StoreError, UpstreamError, WireError
from tradecanvas.ingest.committer import BatchCommitter
from tradecanvas.ingest.core import IngestCore
from tradecanvas.ingest.history_refresh import HistoryChanges, Wakeup, refresh_history
from tradecanvas.ingest.outcomes import Malformed
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.tracker import REPAIR_REASONS, FillRequest
from tradecanvas.model import MINUTE, Candle, SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.bars import listing_key
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.pipeline.publish import MarketSink
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.upstream.binance_ws import (
    ConnectionCounters,
    FrameBurst,
    run_binance_ws_connections,
)
from tradecanvas.upstream.plan import build_combined_stream_url, ws_base_url
from tradecanvas.upstream.rest import BinanceRestClient

log = logging.getLogger(__name__)

# Bursts of frames between a reader and the processor (each 1 to BURST_MAX frames, what
# the reader found queued at one wake-up). Futures push each stream every 250 ms, so 200
# streams are 800 frames/s, arriving mostly a frame a read: this is over a second of the
# busiest connection, far more than the processor (pure CPU, microseconds per frame) ever
# falls behind, and at most 64 Ki frames (about 25 MiB) when every burst is full.
FRAME_BUFFER: Final = 1024
# REST fills of one loop running at once; the REST client paces per host on top of this
FILL_CONCURRENCY: Final = 4
# A commit that falls due lets the rest of a burst already on its way join it: the
# committer yields scheduler rounds until this many in a row brought no frame to the
# processor and no close to the batcher (a socket read takes three rounds to get there:
# trio-websocket's reader, ours, the processor), at most IngestPolicy.burst_settle_s. A
# minute's closes come in several reads (the replay writes 64 frames at a time; Binance as
# TCP splits them), and a close that missed its group waited a whole commit and publish
# more (issue 14's latency p99). A round costs tens of µs when nothing comes.
SETTLE_QUIET_ROUNDS: Final = 3


@attrs.define
class LoopCounters:
    """Live state of one loop, read by IngestSupervisor (statistics, /readyz)."""

    streams: int = 0
    enable_pipeline_publish: bool | None = None  # the kill-switch value the loop runs with
    connection: ConnectionCounters = attrs.Factory(ConnectionCounters)
    committed: int = 0
    held: int = 0


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
    phases: Mapping[SeriesId, int] | None = None,
    history_changes: HistoryChanges | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Ingest ``series`` (one market, at most 200) over one Binance combined-stream
    connection until cancelled: reconnecting, backfilling from REST, batching closed klines
    into ``pipeline`` and publishing them by the path ``enable_pipeline_publish`` chooses
    (the kill-switch; recorded in ``counters.enable_pipeline_publish``).

    ``phases`` maps a base series to its 3d grid phase (seconds) once its 3d history has
    been published (IngestSupervisor fills it in the background); until then no forming 3d
    candle is built for it. ``started()`` once the store heads are loaded and the tasks run
    (not yet connected).
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
        phases=phases if phases is not None else {},
        history_changes=history_changes,
    )
    await loop.run(task_status)


# a listing's first minute may not be in REST's klines yet when its first frame came
LISTING_TRIES: Final = 3
LISTING_RETRY_S: Final = 1.0


@final
class _IngestLoop:
    """The tasks of one run_binance_ws_ingest_loop call around its IngestCore."""

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
        phases: Mapping[SeriesId, int],
        history_changes: HistoryChanges | None = None,
    ) -> None:
        self.core = IngestCore(series, flags=flags, policy=policy)
        self.phases = phases
        self.history_changes = history_changes or HistoryChanges()
        self.series = self.core.series
        self.flags = flags
        self.rest = rest
        self.pipeline = pipeline
        self.hub = hub
        self.metrics = metrics
        self.policy = policy
        self.counters = counters
        counters.streams = len(self.series)
        counters.enable_pipeline_publish = enable_pipeline_publish
        self.url = build_combined_stream_url(
            ws_base_url(flags, self.series[0].market), [s.stream_name for s in self.series]
        )
        self._frames_send, self._frames_recv = trio.open_memory_channel[FrameBurst](FRAME_BUFFER)
        self._batch_wakeup = Wakeup()
        self._fill_wakeup = Wakeup()
        self._forming_wakeup = Wakeup()
        self._forming_timer_at = math.inf  # when the forming timer wakes up by itself
        self._fill_limiter = trio.CapacityLimiter(FILL_CONCURRENCY)
        # when the committer last finished a commit (a close queued before is a backlog)
        self._committed_at = -math.inf
        self._fatal: StoreError | None = None
        self._name = f"binance {self.series[0].market} ({len(self.series)} streams)"
        self.committer = BatchCommitter(
            self.core,
            pipeline=pipeline,
            hub=hub,
            metrics=metrics,
            enable_pipeline_publish=enable_pipeline_publish,
            report_malformed=self._count_malformed,
            emit_forming=self._emit_forming,
            name=self._name,
        )

    # --- lifetime ----------------------------------------------------------------------

    async def run(self, task_status: trio.TaskStatus[None]) -> None:
        await self._load_state()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._process_frames)
                nursery.start_soon(self._emit_due_forming)
                nursery.start_soon(self._commit_batches, nursery.cancel_scope)
                nursery.start_soon(self._run_fills)
                changes, store = self.history_changes, self.pipeline.store
                nursery.start_soon(refresh_history, changes, self.series, self.core, store)
                nursery.start_soon(
                    functools.partial(
                        run_binance_ws_connections,
                        self.url,
                        self._frames_send,
                        policy=self.policy.connection,
                        stale_timeout_s=self.flags.stale_timeout_s,
                        metrics=self.metrics,
                        counters=self.counters.connection,
                        name=self._name,
                    )
                )
                task_status.started()
        finally:
            with trio.CancelScope(shield=True) as scope:
                scope.deadline = trio.current_time() + self.policy.flush_deadline_s
                await self._final_flush()
            self.counters.connection.connected = 0
        if self._fatal is not None:
            raise self._fatal

    async def _load_state(self) -> None:
        """Heads, first minutes, unresolved holes and the recent minutes from the store
        (before any frame is read)."""
        store = self.pipeline.store
        span = self.core.recent_span_s
        for sid in self.series:
            head = await store.head_time(str(sid))
            unresolved = await self.committer.holes.load(sid)
            if unresolved:
                log.info("%s: %d unresolved holes from before; retrying", sid, len(unresolved))
            recent: list[Candle] = []
            first = None
            if head is not None:
                recent = [s.candle for s in await store.range(str(sid), head - span, head + MINUTE)]
                oldest = await store.since(str(sid), -1, 1)  # where its history starts
                first = oldest[0].candle_time if oldest else head
            listed = await store.get_meta(listing_key(str(sid))) if head is not None else None
            self.core.load_series(
                sid,
                head=head,
                first=first,
                unresolved=unresolved,
                recent=recent,
                listing=None if listed is None else int(listed),
            )

    async def _final_flush(self) -> None:
        try:
            while True:
                try:
                    burst = self._frames_recv.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                    break
                self._handle_burst(burst)
            self.core.release_all_held(trio.current_time())
            self.counters.held = self.core.held_count()
            while self.core.queued and self._fatal is None:
                await self._commit_once()
            for sid in self.series:
                holes = self.core.holes_to_save(sid)
                if holes is not None:
                    await self.committer.save_holes(sid, holes)
        except StoreError as exc:
            self._fatal = exc  # raised: the daemon's one line reports it
            log.info("shutdown flush failed: %s", exc)
        except Exception:
            log.exception("shutdown flush failed")
        if self.core.queued and self._fatal is not None:
            # the daemon's one line reports the store failure; a restart repairs them from REST
            log.info("%d closed candles were not committed (the store failed)", self.core.queued)
        elif self.core.queued:
            log.error("%d closed candles were not committed at shutdown", self.core.queued)

    # --- processing (sync per frame) ---------------------------------------------------

    async def _process_frames(self) -> None:
        frames = self._frames_recv
        while True:
            burst = await frames.receive()
            # then every burst already here: one wake-up for them all, and no cancel scope
            # (the forming timer has the only deadline)
            while True:
                self._handle_burst(burst)
                try:
                    burst = frames.receive_nowait()
                except trio.WouldBlock:
                    break
            due = self.core.next_forming_due()
            if due is not None and due < self._forming_timer_at:
                self._forming_wakeup.set()

    async def _emit_due_forming(self) -> None:
        """Throttled forming updates once their interval has passed (the processor wakes
        this task only when one falls due before the time it waits for)."""
        while True:
            due = self.core.next_forming_due()
            self._forming_timer_at = due if due is not None else math.inf
            with trio.move_on_at(self._forming_timer_at):
                await self._forming_wakeup.wait()
            self._forming_timer_at = -math.inf  # awake: no need to be woken
            for sid, candle in self.core.due_forming(trio.current_time()):
                self._emit_forming(sid, candle)

    def _handle_burst(self, burst: FrameBurst) -> None:
        on_frame = self.core.on_frame
        generation, received_at = burst.generation, burst.received_at
        now = trio.current_time()  # one reading for the burst: it is processed at once
        for raw in burst.raws:
            outcome = on_frame(raw, generation=generation, received_at=received_at, now=now)
            if outcome.malformed is not None:
                self._count_malformed(outcome.malformed)
            for sid, candle in outcome.forming:
                self._emit_forming(sid, candle)
            if outcome.wake_committer:
                self._batch_wakeup.set()
            if outcome.wake_fills:
                self._fill_wakeup.set()
        # a run of closes at or below a series' head (a source behind the store): said
        for line in self.core.behind.take_lines():
            log.warning("%s", line)

    def _count_malformed(self, malformed: Malformed) -> None:
        self.metrics.malformed_frames_total.labels(reason=malformed.reason).inc()
        if malformed.first:
            log.warning(
                "%s: dropped a malformed frame (%s): %s",
                self._name,
                malformed.reason,
                malformed.detail[:300],
            )

    def _emit_forming(self, sid: SeriesId, candle: Candle) -> None:
        """Forming base and derived candles to the hub (only queued; never stored)."""
        try:
            phase = self.phases.get(sid)
            for series_id, update in self.core.forming_updates(sid, candle, phase):
                self.hub.publish_forming(series_id, update)
        except Exception:
            if self.core.first_report("forming_publish"):
                log.exception("%s: forming publish failed (logged once)", self._name)

    # --- REST fills ----------------------------------------------------------------------

    async def _run_fills(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                plan = self.core.next_fills(trio.current_time())
                for sid, request in plan.start:
                    nursery.start_soon(self._fill, sid, request)
                for sid, count in plan.forced:
                    log.error(
                        "%s: REST keeps failing; committing %d held candles above a hole"
                        " (retried later)",
                        sid,
                        count,
                    )
                if plan.forced:
                    self._batch_wakeup.set()
                self.counters.held = self.core.held_count()
                with trio.move_on_at(plan.wake_at):
                    await self._fill_wakeup.wait()

    async def _fill(self, sid: SeriesId, request: FillRequest) -> None:
        try:
            await self._fill_once(sid, request)
        finally:
            self._fill_wakeup.set()

    async def _fill_once(self, sid: SeriesId, request: FillRequest) -> None:
        try:
            async with self._fill_limiter:
                candles = await self.rest.klines(sid, request.start, request.end)
        except (UpstreamError, WireError) as exc:
            self.core.on_fill_failed(sid, request, trio.current_time())
            log.warning("%s: REST fill %s failed: %s", sid, request, exc)
            return
        listing_at = None
        # an empty store's first fill that found nothing at its start: a listing inside the
        # range, or at its end (the first live minute: the listing watched as it happened)
        first = candles[0].candle_time if candles else request.end
        if first > request.start and self.core.trackers[sid].before_history:
            listing_at = await self._listing(sid, first)
        outcome = self.core.on_fill_result(
            sid, request, candles, trio.current_time(), listing_at=listing_at
        )
        for forming_sid, candle in outcome.forming:
            self._emit_forming(forming_sid, candle)
        self.counters.held = self.core.held_count()
        if outcome.absent:
            self.metrics.exchange_missing_minutes_total.inc(outcome.absent)
            log.warning(
                "%s: %d minute(s) in %d..%d are missing at the exchange (a gap)",
                sid,
                outcome.absent,
                request.start,
                request.end,
            )
        if request.reason not in REPAIR_REASONS:
            log.info(
                "%s: %s backfill %d..%d: %d candles",
                sid,
                request.reason,
                request.start,
                request.end,
                len(candles),
            )
        self.metrics.backfill_candles_total.inc(outcome.rest_released)
        self.metrics.late_closes_repaired_total.inc(outcome.repaired)
        if outcome.wake_committer:
            self._batch_wakeup.set()
        if outcome.save_holes is not None:
            await self.committer.save_holes(sid, outcome.save_holes)

    async def _listing(self, sid: SeriesId, first: int) -> int | None:
        """``first`` when it is the series' first minute at Binance (its listing: its first
        derived buckets get Binance's bars of the minutes from it on), None when Binance
        has earlier ones (an outage where an empty store's backfill began) or cannot say."""
        try:
            for tries_left in range(LISTING_TRIES - 1, -1, -1):
                async with self._fill_limiter:
                    earliest = await self.rest.first_open_time(sid)
                if earliest is not None or not tries_left:
                    break
                await trio.sleep(LISTING_RETRY_S)  # REST has no bar yet: it lags the stream
        except (UpstreamError, WireError) as exc:
            why = "REST cannot say where the history starts"
            log.warning("%s: %s (%s): no bars for the buckets before %d", sid, why, exc, first)
            return None
        if earliest != first:
            return None
        log.info("%s: listed at %d (Binance has nothing before it)", sid, first)
        return first

    # --- commit and publish ------------------------------------------------------------

    async def _commit_batches(self, loop_scope: trio.CancelScope) -> None:
        while True:
            due = self.core.batch_due_at()
            if due is None:
                await self._batch_wakeup.wait()
                continue
            if due > trio.current_time():
                with trio.move_on_at(due):
                    await self._batch_wakeup.wait()
                continue
            await self._let_the_burst_settle()
            try:
                await self._commit_once()
            except StoreError as exc:
                self._fatal = exc
                loop_scope.cancel()
                return
            self._committed_at = trio.current_time()

    async def _let_the_burst_settle(self) -> None:
        """Yield until SETTLE_QUIET_ROUNDS scheduler rounds in a row brought nothing new
        (at most ``policy.burst_settle_s``): the closes of a burst still being read go in
        this commit. Not when the committer is behind — closes queued while the last commit
        ran are a backlog, not a burst being read — nor once a batch is full."""
        oldest = self.core.batcher.oldest_at()
        if oldest is None or oldest < self._committed_at:
            return
        deadline = trio.current_time() + self.policy.burst_settle_s
        full = self.flags.binance_ws_batch_max
        quiet = 0
        queued = self.core.queued
        frames = self._frames_recv
        while quiet < SETTLE_QUIET_ROUNDS and queued < full and trio.current_time() < deadline:
            await trio.lowlevel.checkpoint()
            now_queued = self.core.queued
            if now_queued != queued or frames.statistics().current_buffer_used:
                quiet = 0
            else:
                quiet += 1
            queued = now_queued

    async def _commit_once(self) -> None:
        batch = self.core.take_batch()
        if batch is None:
            return
        if batch.wake_fills:
            self._fill_wakeup.set()  # fills paused for the backlog may go on after this
        self.counters.committed += await self.committer.commit(batch.items)
