"""The WS ingest's publish path, chosen by the kill-switch (DESIGN §4, "Publish paths").

``TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH`` reaches here as ``enable_pipeline_publish``
(RuntimeFlags → market_runtime_builder → IngestSupervisor → run_binance_ws_ingest_loop).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

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
    outcome = run_publish_steps(_legacy_failures(result, hub))
    if outcome.failed:
        metrics.publish_failed_steps_total.labels(path="legacy").inc(outcome.failed)
    # strict for the base series, but raised only after every other step ran
    outcome.raise_if_strict_failed()
    return outcome.failed


def _legacy_failures(result: PipelineResult, hub: MarketSink) -> Iterator[PublishStep]:
    """The legacy steps, each run here in order; only a step that failed is yielded, as a
    step replaying its outcome, for run_publish_steps to log, count and raise for.

    A burst's commit has hundreds of updates and nearly all succeed: building a named
    PublishStep and a partial for each of them showed up at ~5% of the burst profile.
    """
    for update in result.in_legacy_order():
        outcome: Sequence[str] | Exception
        try:
            outcome = hub.publish_closed(update.series_id, update.candles)
        except Exception as exc:
            outcome = exc
        if outcome:
            yield _replay(f"closed {update.series_id}", outcome, strict=not update.derived)
    for event in result.events_base_first():
        try:
            outcome = hub.publish_system(event)
        except Exception as exc:
            outcome = exc
        if outcome:
            yield _replay(f"system {event.series_id}", outcome, strict=False)


def _replay(name: str, outcome: Sequence[str] | Exception, *, strict: bool) -> PublishStep:
    """A step whose call reports ``outcome`` again: its delivery failures, or its error."""

    def call() -> Sequence[str]:
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return PublishStep(name, call, strict=strict)
