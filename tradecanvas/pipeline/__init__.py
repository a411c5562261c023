"""IngestPipeline: commit → derive → events, then publish(best_effort)."""

from __future__ import annotations

from tradecanvas.pipeline.commit import (
    IngestBatch,
    IngestPipeline,
    PipelineResult,
    PipelineStatistics,
    SeriesUpdate,
)
from tradecanvas.pipeline.events import FACTOR_REBUILD, SystemEvent, rebuild_events_for
from tradecanvas.pipeline.publish import (
    MarketSink,
    PublishOutcome,
    PublishStep,
    PublishTarget,
    run_publish_steps,
)

__all__ = [
    "FACTOR_REBUILD",
    "IngestBatch",
    "IngestPipeline",
    "MarketSink",
    "PipelineResult",
    "PipelineStatistics",
    "PublishOutcome",
    "PublishStep",
    "PublishTarget",
    "SeriesUpdate",
    "SystemEvent",
    "rebuild_events_for",
    "run_publish_steps",
]
