"""BatchCommitter: the committer task's one step, a batch into the store and out to the hub.

::

    IngestCore.take_batch ─▶ BatchCommitter.commit(items)
        ├─ IngestPipeline.run(IngestBatch)   the candles, the absent runs (gap events) and
        │                                    the unresolved-hole records the items carry
        │                                    (StoreHoleMemory), in one transaction
        ├─ publish_pipeline_result_from_ws   the path the kill-switch chooses
        └─ IngestCore.on_committed(items)    only now: the forming candles it held for
                                             these items go out, after their closes

It owns the loop's StoreHoleMemory, so unresolved holes are loaded, recorded with candles
and saved on their own in one place. Each flush is logged at DEBUG; at INFO a FlushSummary
(``ingest/flush_summary.py``) sums them up in one line at most once a minute. Raises
StoreError (the loop stops); a subscriber's failure is counted and logged, never raised.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import final

import trio

from tradecanvas.errors import CandleError, PublishError, StoreError
from tradecanvas.ingest.batcher import BatchItem, Holes, hole_records
from tradecanvas.ingest.core import IngestCore
from tradecanvas.ingest.flush_summary import FlushSummary
from tradecanvas.ingest.outcomes import Malformed
from tradecanvas.ingest.publish import publish_pipeline_result_from_ws
from tradecanvas.ingest.tracker import IngestSource
from tradecanvas.model import Candle, SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline, PipelineResult
from tradecanvas.pipeline.publish import MarketSink
from tradecanvas.store.records import StoreHoleMemory

log = logging.getLogger(__name__)


@final
class BatchCommitter:
    """Commits and publishes the batches of one ingest loop; ``name`` prefixes its log
    lines (each flush at DEBUG, their FlushSummary at INFO), ``report_malformed`` counts a
    candle the store refused and ``emit_forming`` publishes a forming candle the core held
    until this commit was published."""

    def __init__(
        self,
        core: IngestCore,
        *,
        pipeline: IngestPipeline,
        hub: MarketSink,
        metrics: Metrics,
        enable_pipeline_publish: bool,
        report_malformed: Callable[[Malformed], None],
        emit_forming: Callable[[SeriesId, Candle], None],
        name: str,
    ) -> None:
        self.core = core
        self.pipeline = pipeline
        self.hub = hub
        self.metrics = metrics
        self.enable_pipeline_publish = enable_pipeline_publish
        self.report_malformed = report_malformed
        self.emit_forming = emit_forming
        self.name = name
        self.holes = StoreHoleMemory(pipeline.store)
        self.summary = FlushSummary(name, "pipeline" if enable_pipeline_publish else "legacy")

    async def commit(self, items: Sequence[BatchItem]) -> int:
        """Commit and publish ``items`` (one source); returns the candles committed."""
        started = trio.current_time()
        result = await self._run_pipeline(items)
        committed_at = trio.current_time()
        if result is not None:
            # timed from the batch's newest frame to its last subscriber's send
            received = [
                i.released.received_at
                for i in items
                if i.released is not None and i.released.received_at is not None
            ]
            newest = max(received) if received else None
            # corked: each subscriber gets what it is owed of the batch in one write (a
            # chart follows several series)
            with self.metrics.delivery.publishing(newest, trio.current_time), self.hub.corked():
                self._publish(result)
        # after the publish: what subscribers are owed has reached the hub, so the forming
        # candles the core held for it may follow (a refused candle is owed no more either)
        for sid, candle in self.core.on_committed(items, trio.current_time()):
            self.emit_forming(sid, candle)
        if result is None:
            return 0
        now = trio.current_time()
        for item in items:
            if item.released is not None and item.released.received_at is not None:
                self.metrics.ingest_latency_seconds.observe(now - item.released.received_at)
        commit_s, publish_s = committed_at - started, now - committed_at
        log.debug(
            "%s: flush %d received, %d committed, %d duplicates, %d events;"
            " commit %.1f ms, publish %.1f ms (%s)",
            self.name,
            result.received,
            result.committed,
            result.duplicates_dropped,
            len(result.events),
            commit_s * 1e3,
            publish_s * 1e3,
            self.summary.path,
        )
        line = self.summary.add(
            now,
            received=result.received,
            committed=result.committed,
            duplicates=result.duplicates_dropped,
            events=len(result.events),
            commit_s=commit_s,
            publish_s=publish_s,
        )
        if line is not None:
            log.info("%s", line)
        return result.committed

    def _publish(self, result: PipelineResult) -> None:
        self.metrics.candles_committed_total.inc(result.committed)
        if result.committed or result.events:
            try:
                publish_pipeline_result_from_ws(
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
                log.info("%s: legacy publish failed: %s", self.name, exc)

    async def save_holes(self, sid: SeriesId, holes: Holes) -> None:
        """Store the series' unresolved holes on their own (no queued candle carries them:
        a retry found every minute absent at the exchange)."""
        try:
            await self.holes.save(sid, holes)
        except StoreError as exc:
            # harmless: what is stored lists more holes than there are, and a retry of
            # those after a restart stores nothing
            log.warning("%s: could not save the unresolved holes: %s", sid, exc)

    async def _run_pipeline(self, items: Sequence[BatchItem]) -> PipelineResult | None:
        # absent runs go with any source; a batch of them alone stores no candle
        source: IngestSource = next(
            (i.released.source for i in items if i.released is not None), "rest"
        )
        try:
            return await self._run_batch(items, source)
        except CandleError as exc:
            # decode already validated every candle; if one still fails, commit the rest
            log.error("%s: a batch was refused (%s); committing candle by candle", self.name, exc)
        results: list[PipelineResult] = []
        for item in items:
            try:
                results.append(await self._run_batch([item], source))
            except CandleError as exc:
                self.report_malformed(self.core.malformed("bad_candle", str(exc)))
        if not results:
            return None
        return PipelineResult(
            updates=tuple(u for r in results for u in r.updates),
            events=tuple(e for r in results for e in r.events),
            received=sum(r.received for r in results),
            duplicates_dropped=sum(r.duplicates_dropped for r in results),
        )

    async def _run_batch(self, items: Sequence[BatchItem], source: IngestSource) -> PipelineResult:
        """Commit ``items`` with the absent runs and unresolved-hole records they carry, in
        one transaction."""
        holes = hole_records(items)
        meta = tuple(
            entry
            for sid, value in holes.items()
            if (entry := self.holes.record(sid, value)) is not None
        )
        batch = IngestBatch(
            tuple((i.series, c) for i in items if (c := i.candle) is not None),
            source,
            meta,
            absent=tuple((i.series, *i.absent) for i in items if i.absent is not None),
            listed=tuple(
                (i.series, c.candle_time) for i in items if i.listed and (c := i.candle) is not None
            ),
        )
        result = await self.pipeline.run(batch)
        for sid, value in holes.items():
            self.holes.committed(sid, value)
        return result
