"""IngestPipeline: commit → derive → events, then publish(best_effort)."""

from __future__ import annotations

from tradecanvas.pipeline.commit import (
    FACTOR_REBUILD,
    IngestBatch,
    IngestPipeline,
    MarketSink,
    PipelineResult,
    PipelineStatistics,
    PublishStep,
    PublishTarget,
    SeriesUpdate,
    SystemEvent,
    run_publish_steps,
)

__all__ = [
    "FACTOR_REBUILD",
    "IngestBatch",
    "IngestPipeline",
    "MarketSink",
    "PipelineResult",
    "PipelineStatistics",
    "PublishStep",
    "PublishTarget",
    "SeriesUpdate",
    "SystemEvent",
    "run_publish_steps",
]
