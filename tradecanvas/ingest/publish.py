"""The WS ingest's publish path, chosen by the kill-switch (DESIGN §4, "Publish paths").

``TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH`` reaches here as ``enable_pipeline_publish``
(RuntimeFlags → market_runtime_builder → IngestSupervisor → run_binance_ws_ingest_loop).
"""

from __future__ import annotations

import functools

from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline, PipelineResult
from tradecanvas.pipeline.publish import MarketSink, PublishStep, run_publish_steps


def publish_pipeline_result_from_ws(
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
