"""IngestPipeline: commit → derive → rebuild events, then publish (DESIGN §4).

``run(batch)`` is one store transaction: the batch's base candles, every derived candle of
the buckets they touch (recomputed from the *stored* minutes, so backfilled and
out-of-order minutes give the right bars), and the ``factor.rebuild`` events. It returns a
:class:`PipelineResult`; publishing is the separate, synchronous :meth:`IngestPipeline.publish`,
which only queues messages (it never awaits a subscriber).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, final

import attrs
import orjson

from tradecanvas.errors import CandleError
from tradecanvas.model import (
    MINUTE,
    Candle,
    SeriesId,
    Timeframe,
    derivation_sources,
    validate_candle,
)
from tradecanvas.pipeline.derive import Part, derive_parts, parts_in
from tradecanvas.pipeline.events import (
    SystemEvent,
    gap_event,
    rebuild_events_for,
    served_series_events,
)
from tradecanvas.pipeline.publish import PublishStep, PublishTarget, run_publish_steps
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.sqlite import CandleStore, Source, StoreTxn, UpsertOutcome

log = logging.getLogger(__name__)

# the event log retention runs at most this often (wall-clock seconds)
PRUNE_INTERVAL_S: Final = 60.0


@attrs.frozen
class SeriesUpdate:
    """The closed candles of one series that a batch made new or changed, ascending."""

    series_id: str
    candles: tuple[Candle, ...]
    derived: bool
    revised: int = 0  # of ``candles``, how many replaced a different stored value (not new)


@attrs.frozen
class IngestBatch:
    """Closed base candles to commit, with where they came from."""

    candles: tuple[tuple[SeriesId, Candle], ...]
    source: Source
    # store meta entries (key, value) set in the same transaction as the candles: state
    # that must be durable exactly when they are (the ingest loop's unresolved holes)
    meta: tuple[tuple[str, str], ...] = ()
    # base minutes Binance REST confirmed missing, as [start, end) per series: recorded as
    # ``gap`` events, and settled: a derived bucket whose last minute they cover is
    # finalised (incomplete) in this transaction, with or without a candle above them
    absent: tuple[tuple[SeriesId, int, int], ...] = ()

    @classmethod
    def of(cls, series: SeriesId, candles: Iterable[Candle], source: Source) -> IngestBatch:
        return cls(tuple((series, c) for c in candles), source)


@attrs.frozen
class PipelineResult:
    """What one ``run`` committed: per-series updates and the system events."""

    updates: tuple[SeriesUpdate, ...]  # base series first, then derived, as produced
    events: tuple[SystemEvent, ...]
    received: int
    duplicates_dropped: int

    @property
    def committed(self) -> int:
        return sum(len(u.candles) for u in self.updates)

    def in_series_id_order(self) -> list[SeriesUpdate]:
        return sorted(self.updates, key=lambda u: u.series_id)

    def in_legacy_order(self) -> list[SeriesUpdate]:
        """Base series first, then derived series in configured order (as produced)."""
        return [u for u in self.updates if not u.derived] + [u for u in self.updates if u.derived]

    def events_base_first(self) -> list[SystemEvent]:
        derived = {u.series_id for u in self.updates if u.derived}
        return [e for e in self.events if e.series_id not in derived] + [
            e for e in self.events if e.series_id in derived
        ]


@attrs.frozen
class EventRetention:
    """How long the event log keeps events: the newest ``max_events`` of those younger than
    ``max_age_s`` (DESIGN §10; the defaults are the flags' defaults)."""

    max_events: int = 100_000
    max_age_s: float = 7 * 86_400.0


@attrs.frozen
class PipelineStatistics:
    runs: int
    candles_received: int
    candles_committed: int
    duplicates_dropped: int
    publish_steps: int
    publish_failed_steps: int
    rebuild_events: int


def dedupe(candles: Iterable[Candle]) -> tuple[list[Candle], int]:
    """Ascending, one candle per time (the last one given wins); count of dropped repeats."""
    by_time: dict[int, Candle] = {}
    dropped = 0
    for candle in candles:
        if candle.candle_time in by_time:
            dropped += 1
        by_time[candle.candle_time] = candle
    return [by_time[t] for t in sorted(by_time)], dropped


@final
class IngestPipeline:
    """Owns the commit/derive/rebuild step and the publish step. Shared by every ingest
    path (Binance WS loop, REST backfill, HTTP write). Raises StoreError from ``run`` (the
    transaction is rolled back) and PublishError from a strict ``publish``."""

    def __init__(
        self,
        store: CandleStore,
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
        self.sources = derivation_sources(self.derived_timeframes)
        self._order = {tf: i for i, tf in enumerate(self.derived_timeframes)}
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
        cls, store: CandleStore, target: PublishTarget, flags: RuntimeFlags
    ) -> IngestPipeline:
        """The pipeline ``serve`` and ``backfill`` use: the flags' derived timeframes and
        derivation fingerprint."""
        return cls(
            store,
            target,
            flags.derived_timeframes,
            flags.derivation_fingerprint(),
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
        for series, candle in batch.candles:
            if series.timeframe.seconds != MINUTE:
                raise CandleError(f"{series} is not a base (1m) series; only 1m is ingested")
            validate_candle(candle, series.timeframe)
        result = await self.store.write(lambda txn: self._run_in_txn(txn, batch))
        # the fingerprint is settled once the transaction that checked it has committed
        self._fingerprint_checked.update(u.series_id for u in result.updates)
        self._runs += 1
        self._received += result.received
        self._committed += result.committed
        self._dropped += result.duplicates_dropped
        self._events += len(result.events)
        return result

    def _run_in_txn(self, txn: StoreTxn, batch: IngestBatch) -> PipelineResult:
        grouped: dict[SeriesId, list[Candle]] = {}
        for series, candle in batch.candles:
            grouped.setdefault(series, []).append(candle)
        updates: list[SeriesUpdate] = []
        derived_updates: list[SeriesUpdate] = []
        events: list[SystemEvent] = []
        dropped_total = 0
        for key, value in batch.meta:
            txn.set_meta(key, value)
        absent: dict[SeriesId, list[tuple[int, int]]] = {}
        for series, start, end in batch.absent:
            if end > start:
                events.append(gap_event(str(series), "exchange", start, end - MINUTE))
                absent.setdefault(series, []).append((start, end))
        for series in sorted(grouped.keys() | absent.keys()):
            candles, dropped = dedupe(grouped.get(series, ()))
            dropped_total += dropped
            sid = str(series)
            previous_head = txn.head_time(sid)
            changed: list[Candle] = []
            if candles:
                outcomes = txn.upsert(sid, candles, batch.source)
                changed = [
                    c
                    for c, o in zip(candles, outcomes, strict=True)
                    if o is not UpsertOutcome.UNCHANGED
                ]
                events.extend(self._fingerprint_events(txn, sid, previous_head))
                events.extend(rebuild_events_for(sid, previous_head, candles, outcomes))
                if changed:
                    revised = sum(o is UpsertOutcome.REVISED for o in outcomes)
                    updates.append(
                        SeriesUpdate(sid, tuple(changed), derived=False, revised=revised)
                    )
            head = txn.head_time(sid)
            holes = absent.get(series, [])
            if head is None or not (changed or holes):
                continue
            # settled: every minute up to here is stored or confirmed absent at the exchange
            settled = max([head] + [end - MINUTE for _, end in holes])
            series_updates: list[tuple[int, SeriesUpdate]] = []
            for tf in sorted(self.derived_timeframes):
                phase = self.phase_of(series) if tf.phased else 0
                if phase is None:
                    continue  # the symbol's grid is not known yet (see set_phase)
                buckets = {tf.floor(c.candle_time, phase) for c in changed}
                if previous_head is not None and head > previous_head:
                    # the bucket of the old head may have been waiting for a confirmed hole
                    buckets.add(tf.floor(previous_head, phase))
                for start, end in holes:  # the buckets an absent run ends or follows
                    buckets.update(tf.floor(t, phase) for t in (start - MINUTE, end - MINUTE))
                update, tf_events = self._derive(txn, series, tf, sorted(buckets), settled)
                events.extend(tf_events)
                if update is not None:
                    series_updates.append((self._order[tf], update))
            derived_updates.extend(u for _, u in sorted(series_updates, key=lambda x: x[0]))
        return PipelineResult(
            updates=tuple(updates + derived_updates),
            events=self._log_events(txn, events),
            received=len(batch.candles),
            duplicates_dropped=dropped_total,
        )

    def _log_events(self, txn: StoreTxn, events: Sequence[SystemEvent]) -> tuple[SystemEvent, ...]:
        """Write ``events`` to the event log (their ids) and apply the retention (at most
        once every PRUNE_INTERVAL_S)."""
        now = self._clock()
        logged = tuple(
            attrs.evolve(e, event_id=txn.append_event(e.series_id, e.event, e.data, now))
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

        def derive(txn: StoreTxn) -> PipelineResult:
            base = str(series)
            head = txn.head_time(base)
            first = txn.range(base, 0, head + 1)[:1] if head is not None else []
            update: SeriesUpdate | None = None
            events: list[SystemEvent] = []
            if phase is not None and head is not None and first:
                buckets = []
                bucket = timeframe.floor(first[0].candle.candle_time, phase)
                while bucket <= head:
                    buckets.append(bucket)
                    bucket = timeframe.next_open(bucket)
                update, events = self._derive(txn, series, timeframe, buckets, head)
            return PipelineResult(
                updates=() if update is None else (update,),
                events=self._log_events(txn, events),
                received=0,
                duplicates_dropped=0,
            )

        return await self.store.write(derive)

    async def record_served_series(self, series_ids: Sequence[str]) -> tuple[SystemEvent, ...]:
        """Log ``series.added`` / ``series.removed`` for the served set against the one the
        store was last served with (at start-up, before anything is published)."""
        key = "served_series"

        def record(txn: StoreTxn) -> tuple[SystemEvent, ...]:
            stored = txn.get_meta(key)
            previously = orjson.loads(stored) if stored is not None else None
            events = served_series_events(previously, series_ids)
            if events or previously is None:
                txn.set_meta(key, orjson.dumps(sorted(series_ids)).decode())
            return self._log_events(txn, events)

        return await self.store.write(record)

    def _derive(
        self, txn: StoreTxn, base: SeriesId, tf: Timeframe, buckets: Sequence[int], head: int
    ) -> tuple[SeriesUpdate | None, list[SystemEvent]]:
        """Derive ``tf``'s ``buckets`` from the stored source bars; ``head``: the base series
        is settled (stored or confirmed absent) up to this minute, so a bucket whose last
        minute it reached is final even if incomplete."""
        source = self.sources[tf]
        source_sid = str(base.with_timeframe(source))
        sid = str(base.with_timeframe(tf))
        previous_head = txn.head_time(sid)
        derived: list[tuple[Candle, bool]] = []
        incomplete_before = (
            {
                s.candle.candle_time
                for s in txn.range(sid, buckets[0], tf.next_open(buckets[-1]))
                if not s.complete
            }
            if buckets
            else set()
        )
        for bucket in buckets:
            end = tf.next_open(bucket)
            stored = txn.range(source_sid, bucket, end)
            if not stored:
                continue
            result = derive_parts(
                bucket,
                parts_in(source, tf, bucket),
                [Part(s.candle, s.complete) for s in stored],
                None,  # set below, only when needed
            )
            assert result is not None
            if not result.complete and head < end - MINUTE:
                continue  # still filling; finalised once its last minute is settled
            before = txn.last_before(source_sid, bucket)
            if not result.complete and before is None and stored[0].candle.candle_time > bucket:
                # the store's history starts inside this bucket (an initial backfill from
                # a minute that is not bucket-aligned): Binance's bar holds minutes we never
                # fetched, so a bar from ours would be wrong; leave it out
                continue
            if before is not None and all(s.candle.volume == 0 for s in stored):
                # an all-empty bucket is flat at the previous close
                result = derive_parts(
                    bucket,
                    parts_in(source, tf, bucket),
                    [Part(s.candle, s.complete) for s in stored],
                    before.candle.close,
                )
                assert result is not None
            derived.append((result.candle, result.complete))
        if not derived:
            return None, []
        candles = [c for c, _ in derived]
        outcomes: list[UpsertOutcome] = []
        for candle, complete in derived:
            outcomes.extend(txn.upsert(sid, [candle], "derived", complete=complete))
        completed = [
            c.candle_time for c, done in derived if done and c.candle_time in incomplete_before
        ]
        events = self._fingerprint_events(txn, sid, previous_head)
        events.extend(rebuild_events_for(sid, previous_head, candles, outcomes, completed))
        for (candle, done), outcome in zip(derived, outcomes, strict=True):
            if not done and (
                outcome is not UpsertOutcome.UNCHANGED
                or candle.candle_time not in incomplete_before
            ):
                events.append(gap_event(sid, "incomplete", candle.candle_time, candle.candle_time))
        changed = tuple(
            c for c, o in zip(candles, outcomes, strict=True) if o is not UpsertOutcome.UNCHANGED
        )
        revised = sum(o is UpsertOutcome.REVISED for o in outcomes)
        update = SeriesUpdate(sid, changed, derived=True, revised=revised) if changed else None
        return update, events

    def _fingerprint_events(
        self, txn: StoreTxn, series_id: str, previous_head: int | None
    ) -> list[SystemEvent]:
        """Once per series per process: does the store hold it under other settings?"""
        if series_id in self._fingerprint_checked:
            return []
        key = f"fingerprint:{series_id}"
        stored = txn.get_meta(key)
        if stored == self.fingerprint:
            return []
        txn.set_meta(key, self.fingerprint)
        if stored is None or previous_head is None:
            return []
        first = txn.range(series_id, 0, previous_head + 1)[:1]
        start = first[0].candle.candle_time if first else previous_head
        return [SystemEvent(series_id, "fingerprint", start, previous_head)]

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
