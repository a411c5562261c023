"""IngestPipeline: commit → derive → rebuild events, then publish (DESIGN §4).

``run(batch)`` is one store transaction: the batch's base candles, every derived candle of
the buckets they touch (recomputed from the *stored* minutes, so backfilled and
out-of-order minutes give the right bars), and the ``factor.rebuild`` events. It returns a
:class:`PipelineResult`; publishing is the separate, synchronous :meth:`IngestPipeline.publish`,
which only queues messages (it never awaits a subscriber).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, TypeVar, final

import attrs
import orjson

from tradecanvas.errors import CandleError
from tradecanvas.model import (
    MINUTE,
    Candle,
    SeriesId,
    Timeframe,
    plainly_valid,
    validate_candle,
)
from tradecanvas.pipeline.apply import BatchCommit
from tradecanvas.pipeline.batch import (
    SERIES_ID,
    IngestBatch,
    PipelineResult,
    SeriesNames,
    SeriesUpdate,
    dedupe,
)
from tradecanvas.pipeline.events import (
    SystemEvent,
    served_series_events,
)
from tradecanvas.pipeline.levels import DerivationPlan
from tradecanvas.pipeline.publish import PublishStep, PublishTarget, run_publish_steps
from tradecanvas.pipeline.recent import RecentBars
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.interface import MarketStore, WriteTxn

log = logging.getLogger(__name__)
T = TypeVar("T")

# a batch of at most this many entries is committed as a quick write (MarketStore.write):
# on SQLite its Python runs on the event loop's thread, a few ms at most (a live batch is
# at most binance_ws_batch_max, 200 by default); a bigger one, a history, on a worker thread
QUICK_BATCH: Final = 1000
# the event log retention runs at most this often (wall-clock seconds)
PRUNE_INTERVAL_S: Final = 60.0


@attrs.frozen
class EventRetention:
    """How long the event log keeps events: the newest ``max_events`` of those younger than
    ``max_age_s`` (DESIGN §10; the defaults are the flags' defaults)."""

    max_events: int = 100_000
    max_age_s: float = 7 * 86_400.0


# the meta record of the series the store was last served with (JSON, sorted)
SERVED_SERIES_KEY: Final = "served_series"


@attrs.frozen
class PipelineStatistics:
    runs: int
    candles_received: int
    candles_committed: int
    duplicates_dropped: int
    publish_steps: int
    publish_failed_steps: int
    rebuild_events: int


@final
class IngestPipeline:
    """Owns the commit/derive/rebuild step and the publish step. Shared by every ingest
    path (Binance WS loop, REST backfill, HTTP write). Raises StoreError from ``run`` (the
    transaction is rolled back) and PublishError from a strict ``publish``."""

    def __init__(
        self,
        store: MarketStore,
        target: PublishTarget,
        derived_timeframes: Sequence[Timeframe],
        fingerprint: str,
        *,
        retention: EventRetention | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.target = target
        self.derived_timeframes = tuple(derived_timeframes)
        # derived in ascending length, each from its source (already derived in the same
        # transaction); results are reported in configured order
        self._plan = DerivationPlan.of(self.derived_timeframes)
        self.sources = self._plan.sources
        # what the pipeline's own commits wrote and read of the recent bars (write-through)
        self._recent = RecentBars()
        # derived series ids by (base, timeframe): built once, not per commit
        self._names: dict[tuple[str, str], tuple[SeriesId, str]] = {}
        # base series ids' text and order key (BatchCommit.ids)
        self._ids = SeriesNames()
        self.fingerprint = fingerprint
        # the phase (seconds) of each symbol's multi-day grid (3d), by (market, symbol)
        self._phases: dict[tuple[str, str], int] = {}
        self.retention = retention or EventRetention()
        # wall clock: event timestamps and the retention (nothing else here reads it)
        self._clock = clock
        self._next_prune = -math.inf
        self.events_pruned_upto = 0
        self._fingerprint_checked: set[str] = set()
        self._runs = 0
        self._received = 0
        self._committed = 0
        self._dropped = 0
        self._steps = 0
        self._failed_steps = 0
        self._events = 0

    @classmethod
    def from_flags(
        cls,
        store: MarketStore,
        target: PublishTarget,
        flags: RuntimeFlags,
        derived: tuple[Sequence[Timeframe], str] | None = None,
    ) -> IngestPipeline:
        """The pipeline ``serve`` and ``backfill`` use: the flags' derived timeframes and
        derivation fingerprint (``derived``: the timeframes and fingerprint to use instead,
        the store's recorded ones ``backfill`` chose)."""
        timeframes, fingerprint = derived or (
            flags.derived_timeframes,
            flags.derivation_fingerprint(),
        )
        return cls(
            store,
            target,
            timeframes,
            fingerprint,
            retention=EventRetention(
                flags.event_retention_max, flags.event_retention_days * 86_400
            ),
        )

    def set_phase(self, series: SeriesId, phase: int) -> None:
        """The symbol's multi-day grid (Binance's 3d) opens at ``phase`` modulo its length
        (seconds). Until a symbol's phase is known its phased timeframes are not derived."""
        self._phases[(series.market, series.symbol)] = phase

    def phase_of(self, series: SeriesId) -> int | None:
        return self._phases.get((series.market, series.symbol))

    def statistics(self) -> PipelineStatistics:
        return PipelineStatistics(
            runs=self._runs,
            candles_received=self._received,
            candles_committed=self._committed,
            duplicates_dropped=self._dropped,
            publish_steps=self._steps,
            publish_failed_steps=self._failed_steps,
            rebuild_events=self._events,
        )

    async def run(self, batch: IngestBatch) -> PipelineResult:
        """Commit ``batch`` and everything derived from it in one transaction.

        Every candle is validated first: one bad candle (CandleError) rejects the whole
        batch and nothing is stored.
        """
        if not _plainly_valid_minutes(batch.candles):
            for series, candle in batch.candles:
                if series.timeframe.seconds != MINUTE:
                    raise CandleError(f"{series} is not a base (1m) series; only 1m is ingested")
                validate_candle(candle, series.timeframe)
        result = await self._write(
            lambda txn: self._run_in_txn(txn, batch),
            quick=len(batch.candles) + len(batch.absent) <= QUICK_BATCH,
        )
        # the fingerprint is settled once the transaction that checked it has committed
        self._fingerprint_checked.update(map(SERIES_ID, result.updates))
        self._runs += 1
        self._received += result.received
        self._committed += result.committed
        self._dropped += result.duplicates_dropped
        self._events += len(result.events)
        return result

    def _batch_commit(self, txn: WriteTxn) -> BatchCommit:
        self._recent.begin(txn.sequence)
        return BatchCommit(
            txn,
            self._recent,
            self._plan,
            self.phase_of,
            self.fingerprint,
            self._fingerprint_checked,
            self._names,
            self._ids,
        )

    async def _write(self, fn: Callable[[WriteTxn], T], *, quick: bool = False) -> T:
        """Every write of the pipeline: RecentBars forgets what a failed one put in.
        ``quick``: a live batch (see ``MarketStore.write``)."""
        try:
            return await self.store.write(fn, quick=quick)
        except BaseException:
            self._recent.forget()
            raise

    def _run_in_txn(self, txn: WriteTxn, batch: IngestBatch) -> PipelineResult:
        with collector_paused():
            work = self._batch_commit(txn)
            updates, events, dropped = work.commit(batch)
            work.finish()
            return PipelineResult(
                updates=tuple(updates),
                events=self._log_events(txn, events),
                received=len(batch.candles),
                duplicates_dropped=dropped,
            )

    def _log_events(self, txn: WriteTxn, events: Sequence[SystemEvent]) -> tuple[SystemEvent, ...]:
        """Write ``events`` to the event log (their ids) and apply the retention (at most
        once every PRUNE_INTERVAL_S)."""
        now = self._clock()
        # (the event built again, not attrs.evolve: a third of the cost)
        logged = tuple(
            SystemEvent(
                e.series_id,
                e.reason,
                e.from_time,
                e.to_time,
                e.event,
                txn.append_event(e.series_id, e.event, e.data, now),
            )
            for e in events
        )
        if now >= self._next_prune:
            self._next_prune = now + PRUNE_INTERVAL_S
            self.events_pruned_upto = txn.prune_events(
                self.retention.max_events, now - self.retention.max_age_s
            )
        return logged

    async def derive_history(self, series: SeriesId, timeframe: Timeframe) -> PipelineResult:
        """Derive every ``timeframe`` bucket of the base ``series``' stored history in one
        transaction (a symbol's 3d bars once its grid phase is known). Publish the result like
        any other; nothing is derived while the phase is unknown."""
        phase = self.phase_of(series) if timeframe.phased else 0

        def derive(txn: WriteTxn) -> PipelineResult:
            work = self._batch_commit(txn)
            base = str(series)
            head = txn.head_time(base)
            first = txn.first_time(base)
            update: SeriesUpdate | None = None
            events: list[SystemEvent] = []
            if phase is not None and head is not None and first is not None:
                buckets = []
                bucket = timeframe.floor(first, phase)
                while bucket <= head:
                    buckets.append(bucket)
                    bucket = timeframe.next_open(bucket)
                level = next(lv for lv in self._plan.levels if lv.tf == timeframe)
                update, events = work.derive(series, level, buckets, head)
            work.finish()
            return PipelineResult(
                updates=() if update is None else (update,),
                events=self._log_events(txn, events),
                received=0,
                duplicates_dropped=0,
            )

        return await self._write(derive)

    async def record_served_series(self, series_ids: Sequence[str]) -> tuple[SystemEvent, ...]:
        """Log ``series.added`` / ``series.removed`` for the served set against the one the
        store was last served with (at start-up, before anything is published)."""
        key = SERVED_SERIES_KEY

        def record(txn: WriteTxn) -> tuple[SystemEvent, ...]:
            stored = txn.get_meta(key)
            previously = orjson.loads(stored) if stored is not None else None
            events = served_series_events(previously, series_ids)
            if events or previously is None:
                txn.set_meta(key, orjson.dumps(sorted(series_ids)).decode())
            return self._log_events(txn, events)

        return await self._write(record)

    @property
    def recent(self) -> RecentBars:
        """The write-through cache of recent bars (tests and benchmarks read its counters)."""
        return self._recent

    # --- publishing --------------------------------------------------------------------

    def publish(self, result: PipelineResult, *, best_effort: bool) -> int:
        """Queue ``result``: series in ``series_id`` order, then the system events.

        A failing step is isolated (the target closes the failing subscriber), counted and
        logged, and the remaining steps still run. ``best_effort=False`` then raises
        PublishError; ``best_effort=True`` returns the number of failed steps.
        """
        steps = [
            PublishStep(
                f"closed {update.series_id}",
                functools.partial(self.target.publish_closed, update.series_id, update.candles),
                strict=not best_effort,
            )
            for update in result.in_series_id_order()
        ]
        steps += [
            PublishStep(
                f"system {event.series_id} {event.reason}",
                functools.partial(self.target.publish_system, event),
                strict=not best_effort,
            )
            for event in result.events
        ]
        outcome = run_publish_steps(steps)
        self._steps += outcome.steps
        self._failed_steps += outcome.failed
        outcome.raise_if_strict_failed()
        return outcome.failed


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector paused (as it was after) around a commit's Python.
    A commit makes no reference cycle, but allocates a few objects a candle (rows, updates,
    derived bars), most of them gone by its end: with the collector on, every few hundred
    allocations it walked the young objects, and every hundred walks or so every live one.
    Paused, only what outlives the commit counts towards the next walk. ``tradecanvas
    import`` pauses it around each transaction and around parsing a file too: there the
    walks of every live object, the files' candles waiting to be committed included, were a
    sixth of the import's CPU time (``time.process_time``, 3 months, with and without).
    Process-wide: a thread that finds it paused leaves it to the one that paused it."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _plainly_valid_minutes(pairs: Iterable[tuple[SeriesId, Candle]]) -> bool:
    """The checks of ``run`` and ``validate_candle`` for base minutes, in one loop (no call
    a candle but ``plainly_valid``): True only when every pair would pass them (False: let
    them say why)."""
    for series, c in pairs:
        t = c.candle_time
        if not (
            series.timeframe.seconds == MINUTE
            and type(t) is int
            and t >= 0
            and t % MINUTE == 0
            and plainly_valid(c)
        ):
            return False
    return True


__all__ = [
    "EventRetention",
    "IngestBatch",
    "IngestPipeline",
    "PipelineResult",
    "PipelineStatistics",
    "SeriesUpdate",
    "dedupe",
]
