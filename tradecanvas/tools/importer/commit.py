"""Commits of ``tradecanvas import``: the pipeline's commit/derive step in large
transactions, with one ``factor.rebuild`` (reason ``import``) per series at the end.

:class:`ArchiveCommitter` wraps an :class:`~tradecanvas.pipeline.IngestPipeline` (its store,
derived timeframes, fingerprint, grid phases and write-through recent bars) and runs the same
:class:`~tradecanvas.pipeline.apply.BatchCommit` its ``run`` does, so the candles are stored
and every touched bucket derived exactly as for live or REST data — or, for a series the
store does not hold yet, the short way of :mod:`~tradecanvas.tools.importer.fresh`, which
stores the same rows without a ``Candle`` a row (a test holds the two equal). What differs
is the events: the per-transaction ``factor.rebuild`` events (``new_series``, ``backfill``,
``revision``) are not logged; instead each transaction records, in the store's meta table,
the range of ``candle_time`` each series changed so far (``import_pending``), and
:meth:`finish` logs one ``factor.rebuild`` with reason ``import`` and that exact range per
series, then clears the record (also when the import is interrupted by a signal). An import
that crashed leaves the record, so the next run's single event covers what both changed.
``gap`` events and ``fingerprint`` rebuilds are logged as ``run`` logs them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from typing import Final, final

import attrs
import orjson

from tradecanvas.model import Candle, SeriesId, validate_candle
from tradecanvas.pipeline.apply import BatchCommit
from tradecanvas.pipeline.batch import IngestBatch, SeriesUpdate
from tradecanvas.pipeline.commit import IngestPipeline, collector_paused
from tradecanvas.pipeline.events import FACTOR_REBUILD, SystemEvent
from tradecanvas.pipeline.levels import DerivationPlan, Level
from tradecanvas.store.interface import WriteTxn
from tradecanvas.store.txn import StoreTxn
from tradecanvas.tools.importer.fresh import Fresh, FreshSeries, Written
from tradecanvas.wire.archive import plainly_valid
from tradecanvas.wire.kline_columns import KlineColumns

# the meta entry holding the ranges changed by an import not yet finished
PENDING_KEY: Final = "import_pending"
IMPORT_REASON: Final = "import"
# the rebuild reasons the one ``import`` event stands for
_SUPERSEDED: Final = frozenset({"new_series", "backfill", "revision"})

Ranges = dict[str, tuple[int, int]]


@attrs.frozen
class ImportCommit:
    """What one transaction committed: the candles changed per series and the count of base
    candles given."""

    updates: tuple[Written, ...]
    received: int
    rebuilds: int = 0  # factor.rebuild events logged with it (a fingerprint rebuild)


def written_of(updates: Sequence[SeriesUpdate]) -> list[Written]:
    """The pipeline's updates as counts and ranges."""
    return [
        Written(u.series_id, u.derived, len(u.candles), u.candles[0].candle_time,
                u.candles[-1].candle_time, u.revised)
        for u in updates
        if u.candles
    ]  # fmt: skip


def merge_ranges(ranges: Ranges, written: Sequence[Written]) -> Ranges:
    """``ranges`` widened by the candles ``written`` changed."""
    merged = dict(ranges)
    for w in written:
        if not w.rows:
            continue
        low, high = w.first, w.last
        if w.series_id in merged:
            old_low, old_high = merged[w.series_id]
            low, high = min(low, old_low), max(high, old_high)
        merged[w.series_id] = (low, high)
    return merged


def _load_ranges(text: str | None) -> Ranges:
    if not text:
        return {}
    try:
        loaded = orjson.loads(text)
        return {str(sid): (int(span[0]), int(span[1])) for sid, span in loaded.items()}
    except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError, IndexError):
        return {}


def _dump_ranges(ranges: Ranges) -> str:
    return orjson.dumps({sid: list(span) for sid, span in sorted(ranges.items())}).decode()


@final
class ArchiveCommitter:
    """Large transactions through ``pipeline``'s commit step; raises StoreError (the
    transaction is rolled back) and CandleError (a refused candle: nothing stored)."""

    def __init__(self, pipeline: IngestPipeline, clock: Callable[[], float] = time.time) -> None:
        self.pipeline = pipeline
        self.plan = DerivationPlan.of(pipeline.derived_timeframes)
        self.clock = clock
        self._checked: set[str] = set()
        self._names: dict[tuple[str, str], tuple[SeriesId, str]] = {}
        self.pending: Ranges = {}
        # factor.rebuild events the transactions logged (the one of finish aside)
        self.rebuilds_logged = 0
        # each base series' short way while it may be taken (None: no more this import)
        self._fresh: dict[str, FreshSeries | None] = {}
        # the number of this committer's last transaction (StoreTxn.sequence): the next one
        # is one more only when nothing else wrote to the store in between
        self._sequence: int | None = None

    def levels_of(self, series: SeriesId) -> list[tuple[Level, int]]:
        """The levels whose buckets a transaction of the base ``series`` must not cut
        (:func:`~tradecanvas.tools.importer.cuts.transaction_end`), shortest first, each with
        its phase (a phased one whose phase is not known yet is not derived: left out); none
        while the series takes the short way, which carries a bucket's sums over to the next
        transaction (:mod:`~tradecanvas.tools.importer.fresh`)."""
        if self._fresh.get(str(series)) is not None:
            return []
        phase = self.pipeline.phase_of(series)
        levels = self.plan.levels
        if phase is None:
            return [(level, 0) for level in levels if not level.tf.phased]
        return [(level, phase if level.tf.phased else 0) for level in levels]

    async def load_pending(self) -> Ranges:
        """The ranges an earlier, interrupted import changed (its event is still owed)."""
        self.pending = _load_ranges(await self.pipeline.store.get_meta(PENDING_KEY))
        return dict(self.pending)

    def _log(self, txn: WriteTxn, events: Sequence[SystemEvent]) -> None:
        now = self.clock()
        for event in events:
            txn.append_event(event.series_id, event.event, event.data, now)

    async def commit(
        self,
        series: SeriesId,
        candles: Sequence[Candle] | KlineColumns,
        *,
        checked: bool = False,
    ) -> ImportCommit:
        """Store ``candles`` of the base ``series`` and derive every bucket they touch, in
        one transaction. ``checked``: every candle passed ``validate_candle`` already (the
        archive parser checks each row it reads). A series the store does not hold yet goes
        the short way (:mod:`~tradecanvas.tools.importer.fresh`) while it can."""
        if isinstance(candles, KlineColumns):
            columns: KlineColumns | None = candles
            given: Sequence[Candle] = ()
            count = len(candles)
        else:
            columns, given, count = None, candles, len(candles)
        timeframe = series.timeframe
        for candle in () if checked else given:
            if not (timeframe.is_open_time(candle.candle_time) and plainly_valid(candle)):
                validate_candle(candle, timeframe)
        sid = str(series)
        fresh = (
            self._fresh[sid]
            if sid in self._fresh
            else FreshSeries(series, self.plan, self.pipeline.phase_of, self.pipeline.fingerprint)
        )
        if fresh is not None and (columns is None or not fresh.takes(columns)):
            fresh = None
        recent = self.pipeline.recent

        def in_txn(txn: WriteTxn) -> tuple[ImportCommit, Ranges, Fresh | None]:
            with collector_paused():
                # the short way knows the store: nothing of the series stored when it starts,
                # only this committer's transactions since
                if (
                    fresh is not None
                    and columns is not None
                    and isinstance(txn, StoreTxn)
                    and (
                        not txn.heads_of(fresh.series_ids())
                        if fresh.head is None
                        else self._sequence is not None and txn.sequence == self._sequence + 1
                    )
                ):
                    done = fresh.commit(txn, columns)
                    return (*self._logged(txn, done.written, done.events, count), done)
                return (*commit_in(txn), None)

        def commit_in(txn: WriteTxn) -> tuple[ImportCommit, Ranges]:
            recent.begin(txn.sequence)
            work = BatchCommit(
                txn,
                recent,
                self.plan,
                self.pipeline.phase_of,
                self.pipeline.fingerprint,
                self._checked,
                self._names,
            )
            batch_candles = given if columns is None else columns.candles()
            batch = IngestBatch(tuple(zip(itertools.repeat(series), batch_candles)), "rest")
            updates, events, _ = work.commit(batch)
            work.finish()
            return self._logged(txn, written_of(updates), events, count)

        try:
            done, ranges, kept, self._sequence = await self.pipeline.store.write(
                lambda txn: (*in_txn(txn), txn.sequence)
            )
        except BaseException:
            recent.forget()
            raise
        if kept is None:
            self._fresh[sid] = None  # the pipeline's way from here on (it knows the store)
        else:
            assert fresh is not None
            fresh.kept(kept)
            self._fresh[sid] = fresh
        self._checked.add(sid)
        self.pending = ranges
        self.rebuilds_logged += done.rebuilds
        return done

    def _logged(
        self,
        txn: WriteTxn,
        written: list[Written],
        events: Sequence[SystemEvent],
        received: int,
    ) -> tuple[ImportCommit, Ranges]:
        """Record the ranges ``written`` changed and log ``events`` (but the rebuilds the
        one ``import`` event stands for)."""
        ranges = merge_ranges(self.pending, written)
        if ranges != self.pending:
            txn.set_meta(PENDING_KEY, _dump_ranges(ranges))
        logged = [e for e in events if not (e.event == FACTOR_REBUILD and e.reason in _SUPERSEDED)]
        self._log(txn, logged)
        rebuilds = sum(e.event == FACTOR_REBUILD for e in logged)
        return ImportCommit(tuple(written), received, rebuilds), ranges

    async def finish(self) -> tuple[SystemEvent, ...]:
        """Log the one ``factor.rebuild`` (``import``) per series changed, with its range,
        and clear the record; nothing when nothing changed."""
        if not self.pending:
            return ()
        events = tuple(
            SystemEvent(sid, IMPORT_REASON, low, high)
            for sid, (low, high) in sorted(self.pending.items())
        )

        def in_txn(txn: WriteTxn) -> tuple[SystemEvent, ...]:
            now = self.clock()
            logged = tuple(
                attrs.evolve(e, event_id=txn.append_event(e.series_id, e.event, e.data, now))
                for e in events
            )
            txn.set_meta(PENDING_KEY, "{}")
            return logged

        logged = await self.pipeline.store.write(in_txn)
        self.pending = {}
        return logged


__all__ = [
    "IMPORT_REASON",
    "PENDING_KEY",
    "ArchiveCommitter",
    "ImportCommit",
    "merge_ranges",
    "written_of",
]
