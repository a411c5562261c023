"""Publishing a pipeline result: the steps, how a failing one is isolated, and the target
protocol the Hub implements (DESIGN §4, ``best_effort``)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

import attrs

from tradecanvas.errors import PublishError
from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent

log = logging.getLogger(__name__)


@attrs.frozen
class PublishStep:
    """One publish call (one series' closed candles, or one system event)."""

    name: str
    call: Callable[[], Sequence[str]]
    strict: bool = False  # a failure makes the whole publish raise PublishError


@attrs.frozen
class PublishOutcome:
    steps: int
    failed: int
    strict_failures: tuple[str, ...]

    def raise_if_strict_failed(self) -> None:
        if self.strict_failures:
            raise PublishError(list(self.strict_failures))


def run_publish_steps(steps: Iterable[PublishStep]) -> PublishOutcome:
    """Run every step in order, whatever failed before it.

    A failing step (the target reports failed deliveries: INFO; or raises: ERROR) is logged
    and counted; the target has already isolated the failing subscriber. Later steps still
    run because a skipped step would be lost for the healthy subscribers: candles could be
    healed from the store, but system events are not stored. The caller raises for strict failures
    (:meth:`PublishOutcome.raise_if_strict_failed`) once everything has been queued.
    """
    count = failed = 0
    strict: list[str] = []
    for step in steps:
        count += 1
        try:
            problems = [str(p) for p in step.call()]
        except Exception as exc:
            problems = [f"{type(exc).__name__}: {exc}"]
            log.exception("publish step %s raised", step.name)
        if not problems:
            continue
        failed += 1
        # a subscriber the target failed (logged there: the Hub's queueing error, with its
        # traceback; a client gone is no failure and not reported); a step that raised is
        # logged above with its traceback
        log.info(
            "publish step %s: %d delivery failure(s): %s", step.name, len(problems), problems[:3]
        )
        if step.strict:
            strict.extend(f"{step.name}: {p}" for p in problems)
    return PublishOutcome(count, failed, tuple(strict))


class PublishTarget(Protocol):
    """Where results go (the Hub). Both calls only queue messages and never block.

    Each returns a description per delivery that failed (the failing subscriber is already
    isolated by the target); raising counts as a failure of the whole step.
    """

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]: ...

    def publish_system(self, event: SystemEvent) -> Sequence[str]: ...


class MarketSink(PublishTarget, Protocol):
    """The Hub as the ingest side sees it: closed and system publishes plus forming updates.

    ``publish_forming`` only queues (never blocks) and is never stored. ``corked`` wraps
    the publishes of one committed batch: a sink that writes to subscribers may hold what
    they get and write it per subscriber in one go at the block's end
    (``serve.hub.Hub.corked``); any other sink returns ``contextlib.nullcontext()``.
    """

    def publish_forming(self, series_id: str, candle: Candle) -> None: ...

    def corked(self) -> contextlib.AbstractContextManager[None]: ...
