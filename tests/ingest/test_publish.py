"""The WS ingest's publish path chosen by the kill-switch, without sockets."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from typing import cast

import pytest

from tests.conftest import flat_minutes
from tradecanvas.errors import PublishError
from tradecanvas.ingest.publish import publish_pipeline_result_from_ws
from tradecanvas.model import Candle
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline, PipelineResult, SeriesUpdate
from tradecanvas.pipeline.events import SystemEvent

BASE = "binance:futures:BTC/USDT:1m"
FIVE = "binance:futures:BTC/USDT:5m"
T0 = 1_751_760_000


class Hub:
    """Records the calls in order; ``failing`` series report a failed delivery."""

    def __init__(self, failing: Sequence[str] = ()) -> None:
        self.calls: list[str] = []
        self.failing = set(failing)

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        self.calls.append(f"closed {series_id}")
        return ["socket broke"] if series_id in self.failing else []

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        self.calls.append(f"system {event.series_id}")
        return []

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        raise AssertionError("no forming here")

    def corked(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class Pipeline:
    def __init__(self) -> None:
        self.calls: list[bool] = []

    def publish(self, result: PipelineResult, *, best_effort: bool) -> int:
        self.calls.append(best_effort)
        return 2


def result() -> PipelineResult:
    minutes = tuple(flat_minutes(T0, 5))
    # as the pipeline produces them: the base series first, then derived ones
    return PipelineResult(
        updates=(
            SeriesUpdate(BASE, minutes, derived=False),
            SeriesUpdate(FIVE, minutes[:1], derived=True),
        ),
        events=(SystemEvent(FIVE, "new_series", T0, T0), SystemEvent(BASE, "new_series", T0, T0)),
        received=5,
        duplicates_dropped=0,
    )


def count(metrics: Metrics, name: str, path: str) -> float:
    return metrics.registry.get_sample_value(name, {"path": path}) or 0.0


def publish(hub: Hub, pipeline: Pipeline, metrics: Metrics, enabled: bool) -> int:
    return publish_pipeline_result_from_ws(
        result(),
        pipeline=cast(IngestPipeline, pipeline),
        hub=hub,
        metrics=metrics,
        enable_pipeline_publish=enabled,
    )


def test_pipeline_path_is_ingest_pipeline_publish_best_effort() -> None:
    hub, pipeline, metrics = Hub(), Pipeline(), Metrics()
    assert publish(hub, pipeline, metrics, True) == 2
    assert pipeline.calls == [True] and hub.calls == []
    assert count(metrics, "tradecanvas_publish_total", "pipeline") == 1
    assert count(metrics, "tradecanvas_publish_total", "legacy") == 0
    assert count(metrics, "tradecanvas_publish_failed_steps_total", "pipeline") == 2


def test_legacy_path_publishes_base_first_then_derived_then_events_base_first() -> None:
    hub, pipeline, metrics = Hub(), Pipeline(), Metrics()
    assert publish(hub, pipeline, metrics, False) == 0
    assert pipeline.calls == []  # the loop publishes itself
    assert hub.calls == [f"closed {BASE}", f"closed {FIVE}", f"system {BASE}", f"system {FIVE}"]
    assert count(metrics, "tradecanvas_publish_total", "legacy") == 1
    assert count(metrics, "tradecanvas_publish_total", "pipeline") == 0


def test_legacy_base_failure_raises_after_every_other_step_ran() -> None:
    hub, metrics = Hub(failing=[BASE]), Metrics()
    with pytest.raises(PublishError, match="socket broke"):
        publish(hub, Pipeline(), metrics, False)
    assert len(hub.calls) == 4
    assert count(metrics, "tradecanvas_publish_failed_steps_total", "legacy") == 1


def test_legacy_derived_failure_is_best_effort() -> None:
    hub, metrics = Hub(failing=[FIVE]), Metrics()
    assert publish(hub, Pipeline(), metrics, False) == 1
    assert len(hub.calls) == 4
    assert count(metrics, "tradecanvas_publish_failed_steps_total", "legacy") == 1
