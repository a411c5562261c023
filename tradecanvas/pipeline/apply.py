"""BatchCommit: the work of one pipeline transaction — upsert a batch's minutes, derive the
buckets they touch, and say which system events that calls for (DESIGN §4). Synchronous; it
runs on the store's writer thread inside ``CandleStore.write``.

The fast path of issue 14, the original's rules unchanged (tests hold it to a reference):

- each series' candles are planned against the stored rows at their times
  (:func:`plan_upsert`); the rows of every series are written together, one
  ``WriteTxn.write_rows`` (on SQLite multi-row ``INSERT``s), before any read of the store
  and at the end;
- a minute above a known head is new without a read; a live minute takes a short way
  (:meth:`_live_minute`) when it makes no bar due (every timeframe's bucket still filling)
  or only bars whose parts RecentBars holds, all complete (minutes; for 15m from 5m the 5m
  bars, the last one made by this same minute: :func:`due_bars`);
- only a bucket whose last minute is settled can give a bar, so no other is derived;
- a derived bucket is built from its source bars as they are *now*, taken from what this
  transaction wrote and what :class:`RecentBars` knows of the store, so only the parts of a
  bucket nobody has seen are read (a live minute reads nothing; a batch of history reads
  nothing it holds itself);
- the bar before a bucket is looked up only for the buckets that need it (all empty, or
  incomplete at the start of the store's history), and the series' listing only for a
  bucket the store's history starts inside (the rule of one bucket: :mod:`.bars`).
"""

from __future__ import annotations

import functools
import itertools
import operator
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Final, final

from tradecanvas.model import MINUTE, Candle, SeriesId, Timeframe
from tradecanvas.pipeline.bars import bucket_bar, read_listing, record_listings
from tradecanvas.pipeline.batch import (
    IngestBatch,
    SeriesNames,
    SeriesUpdate,
    dedupe,
    group_by_series,
    strictly_ascending,
)
from tradecanvas.pipeline.derive import plan_bars
from tradecanvas.pipeline.events import SystemEvent, gap_event, rebuild_events_for
from tradecanvas.pipeline.levels import (
    DerivationPlan,
    Level,
    bucket_runs,
    buckets_of,
    runs_of,
)
from tradecanvas.pipeline.live import due_bars, level_marks
from tradecanvas.pipeline.recent import FlushingReader, RecentBars
from tradecanvas.store.interface import WriteTxn
from tradecanvas.store.types import Source, StoredCandle, UpsertOutcome, plan_upsert

# base times further apart than this are read as separate ranges (a revision far back and
# today's minutes are two short reads, not one of everything in between)
RUN_GAP_S: Final = 64 * MINUTE
# a transaction that wrote this many rows per series it touched (history) trims RecentBars
# at once; others every RecentBars.TRIM_EVERY transactions
TRIM_ROWS_PER_SERIES: Final = 8
# source bars derived per step of a long derivation (derive_history): bounds the memory
SOURCE_BARS_PER_STEP: Final = 4096
# named tuples built past their own (Python) ``__new__``: 1,600 instructions, not 2,900
_tuple: Final = tuple.__new__


@final
class BatchCommit:
    """One write transaction's commit and derivation. Raises what the store raises."""

    def __init__(
        self,
        txn: WriteTxn,
        recent: RecentBars,
        plan: DerivationPlan,
        phase_of: Callable[[SeriesId], int | None],
        fingerprint: str,
        fingerprint_checked: set[str],
        names: dict[tuple[str, str], tuple[SeriesId, str]] | None = None,
        ids: SeriesNames | None = None,
    ) -> None:
        self.txn = txn
        self.recent = recent
        self.plan = plan
        self.phase_of = phase_of
        self.fingerprint = fingerprint
        self.fingerprint_checked = fingerprint_checked
        self.names = names if names is not None else {}
        # a base series' id text and order key: kept by the pipeline, so worked out once
        # per series, not per series and batch
        self.ids = ids if ids is not None else SeriesNames()
        self._touched: dict[str, SeriesId] = {}
        # rows planned but not yet written: the rows of every series go in one write_rows,
        # written before any read of the store (and before RecentBars forgets anything)
        self._pending: list[tuple[str, StoredCandle]] = []
        self._written = 0
        self._bars_made = False  # the short way made derived bars (a minute ending buckets)
        # every derived grid is fixed and the same for all symbols (no 3d, no 1M)
        self._grid_only = all(level.length is not None for level in plan.levels)
        self._marks: list[tuple[Level, int, int, bool]] = []
        self._marks_at: int | None = None
        self._listings: dict[str, int | None] = {}  # by base series (bars.read_listing)
        self.reader = FlushingReader(txn, self.flush)

    def commit(self, batch: IngestBatch) -> tuple[list[SeriesUpdate], list[SystemEvent], int]:
        """Store ``batch`` and derive from it: the updates (base series first, then derived),
        the events to log, and the count of repeated candles dropped."""
        txn = self.txn
        updates: list[SeriesUpdate] = []
        derived_updates: list[SeriesUpdate] = []
        events: list[SystemEvent] = []
        dropped_total = 0
        for key, value in batch.meta:
            txn.set_meta(key, value)
        if batch.listed:
            record_listings(txn, batch.listed)
        absent: dict[SeriesId, list[tuple[int, int]]] = {}
        for series, start, end in batch.absent:
            if end > start:
                events.append(gap_event(str(series), "exchange", start, end - MINUTE))
                absent.setdefault(series, []).append((start, end))
        # a live batch (a minute a series) is named pair by pair, without a grouping
        named = None if absent else self.ids.each_once(batch.candles)
        if named is None:
            grouped = group_by_series(batch.candles)
            for series in absent.keys() - grouped.keys():
                grouped[series] = []
            named = self.ids.grouped(grouped)
        heads_learned = False
        for index, (_, sid, series, given) in enumerate(named):
            if len(given) == 1 and not absent:
                made = self._live_minute(series, sid, given[0], batch.source, events)
                if made is not None:
                    updates.append(_tuple(SeriesUpdate, (sid, (given[0],), False, 0)))
                    if made:
                        if len(made) == 1:
                            derived_updates.append(made[0][1])
                        else:
                            derived_updates.extend(u for _, u in sorted(made, key=_by_order))
                    continue
            if len(given) == 1 or strictly_ascending(given):
                candles: Sequence[Candle] = given
            else:
                candles, dropped = dedupe(given)
                dropped_total += dropped
            self._touched[sid] = series
            if not heads_learned and not self.recent.knows_head(sid):
                # a head to read: those of every series left in the batch, in one read
                heads_learned = True
                self.recent.learn_heads(
                    self.reader, self._head_candidates((s, i) for _, i, s, _ in named[index:])
                )
            previous_head = self.recent.head(self.reader, sid)
            changed: Sequence[Candle] = ()
            # times of the rows written: changed, or unchanged but gaining extras (derive again)
            rewritten: list[int] = []
            if candles:
                if previous_head is None or candles[0].candle_time > previous_head:
                    # all above the head (the live minute): new, and nothing to read
                    outcomes = [UpsertOutcome.NEW] * len(candles)
                    rows = [_tuple(StoredCandle, (c, batch.source, True)) for c in candles]
                    self._write(sid, rows)
                    changed = candles
                    rewritten = [c.candle_time for c in candles]
                else:
                    outcomes = self._upsert_base(sid, candles, batch, rewritten)
                    changed = [
                        c
                        for c, o in zip(candles, outcomes, strict=True)
                        if o is not UpsertOutcome.UNCHANGED
                    ]
                if sid not in self.fingerprint_checked:
                    events.extend(self.fingerprint_events(sid, previous_head))
                if changed is not candles or previous_head is None:
                    events.extend(rebuild_events_for(sid, previous_head, candles, outcomes))
                if changed:
                    revised = outcomes.count(UpsertOutcome.REVISED)  # (C: no Python a row)
                    updates.append(_tuple(SeriesUpdate, (sid, tuple(changed), False, revised)))
            head = self.recent.head(self.reader, sid)
            holes = absent.get(series, []) if absent else []
            if head is None or not (rewritten or holes):
                continue
            # settled: every minute up to here is stored or confirmed absent at the exchange
            settled = max([head] + [end - MINUTE for _, end in holes])
            series_updates: list[tuple[int, SeriesUpdate]] = []
            single = len(rewritten) == 1 and not holes
            for level in self.plan.levels:
                phase = self.phase_of(series) if level.tf.phased else 0
                if phase is None:
                    continue  # the symbol's grid is not known yet (see set_phase)
                if single:  # the live minute
                    buckets = {level.floor(rewritten[0], phase)}
                else:
                    buckets = buckets_of(level, phase, rewritten)
                if previous_head is not None and head > previous_head:
                    # the bucket of the old head may have been waiting for a confirmed hole;
                    # not if its bar is stored complete (none of its parts changed here)
                    waiting = level.floor(previous_head, phase)
                    if waiting not in buckets and not self.recent.holds_complete(
                        self._name(series, sid, level.tf)[1], waiting
                    ):
                        buckets.add(waiting)
                for start, end in holes:  # the buckets an absent run ends or follows
                    buckets.update(level.floor(t, phase) for t in (start - MINUTE, end - MINUTE))
                # only a bucket whose last minute is settled can give a bar: complete needs
                # that minute stored, incomplete waits for it (the rule in _bar)
                due = [b for b in sorted(buckets) if level.next_open(b) - MINUTE <= settled]
                if not due:
                    continue
                update, tf_events = self.derive(series, level, due, settled, base_sid=sid)
                events.extend(tf_events)
                if update is not None:
                    series_updates.append((level.order, update))
            derived_updates.extend(u for _, u in sorted(series_updates, key=_by_order))
        return updates + derived_updates, events, dropped_total

    def _head_candidates(self, base: Iterable[tuple[SeriesId, str]]) -> Iterator[str]:
        """The ids of the ``base`` series (with their id text) and of every series derived
        from them."""
        for series, sid in base:
            yield sid
            for level in self.plan.levels:
                yield self._name(series, sid, level.tf)[1]

    def _live_minute(
        self,
        series: SeriesId,
        sid: str,
        candle: Candle,
        source: Source,
        events: list[SystemEvent],
    ) -> Sequence[tuple[int, SeriesUpdate]] | None:
        """The short way for a live minute: one new candle above the series' known head,
        whose due bars (if any) are complete from known parts (:func:`due_bars`). It does what
        the long way would do then — store the minute and the bars, and for a bar that is
        its series' first, check the fingerprint and add the ``new_series`` event to
        ``events`` — and returns the bars' updates with their configured order (None: not
        applied, take the long way)."""
        if not self._grid_only or sid not in self.fingerprint_checked:
            return None
        recent = self.recent
        known = recent.live(sid)
        t = candle.candle_time
        head = None if known is None else known.head
        if known is None or head is None or t <= head:
            return None
        due: list[tuple[Level, int, tuple[SeriesId, str]]] | None = None
        if t != self._marks_at:  # (the same for every series of a live batch)
            self._marks, self._marks_at = level_marks(self.plan.levels, t), t
        for level, length, bucket, is_due in self._marks:
            if head < bucket or is_due:  # (head < t: in t's bucket unless below its start)
                name = self._name(series, sid, level.tf)
                waiting = head - (head - level.offset) % length  # the old head's bucket
                if waiting != bucket and not recent.holds_complete(name[1], waiting):
                    return None  # which may be owed its bar
                if is_due:
                    if due is None:
                        due = []
                    due.append((level, bucket, name))
        bars = () if due is None else due_bars(recent, self.fingerprint_checked, sid, candle, due)
        if bars is None:
            return None
        row = _tuple(StoredCandle, (candle, source, True))
        known.above_head(t, row)
        pending = self._pending
        pending.append((sid, row))
        self._touched[sid] = series
        if due is None:  # (no bar due: the usual live minute)
            self._written += 1
            return _NO_BARS
        made: list[tuple[int, SeriesUpdate]] = []
        for (level, _, (derived, dsid)), (bar, first) in zip(due, bars, strict=True):
            derived_row = _tuple(StoredCandle, (bar, "derived", True))
            if first:  # nothing stored: as the long way, fingerprint and new_series
                recent.wrote(dsid, [derived_row])
                events.extend(self.fingerprint_events(dsid, None))
                t = bar.candle_time
                events.append(SystemEvent(dsid, "new_series", t, t))
            else:
                recent.wrote_above_head(dsid, derived_row)
            pending.append((dsid, derived_row))
            self._touched[dsid] = derived
            made.append((level.order, _tuple(SeriesUpdate, (dsid, (bar,), True, 0))))
        self._written += 1 + len(bars)
        self._bars_made = True
        return made

    def _upsert_base(
        self, sid: str, candles: Sequence[Candle], batch: IngestBatch, rewritten: list[int]
    ) -> list[UpsertOutcome]:
        """Upsert ascending, distinct ``candles``: one read per run of nearby times (only of
        what RecentBars does not know), one write; ``rewritten`` gets the written rows' times."""
        stored: dict[int, StoredCandle] = {}
        for first, last in runs_of([c.candle_time for c in candles], RUN_GAP_S):
            stored.update(
                (s.candle.candle_time, s)
                for s in self.recent.range(self.reader, sid, first, last + 1)
            )
        outcomes: list[UpsertOutcome] = []
        rows: list[StoredCandle] = []
        for candle in candles:
            outcome, row = plan_upsert(stored.get(candle.candle_time), candle, batch.source, True)
            outcomes.append(outcome)
            if row is not None:
                rows.append(row)
                rewritten.append(candle.candle_time)
        self._write(sid, rows)
        return outcomes

    def _write(self, sid: str, rows: list[StoredCandle]) -> None:
        self._written += len(rows)
        if rows:
            self.recent.wrote(sid, rows)
            self._pending.extend(zip(itertools.repeat(sid), rows))

    def flush(self) -> None:
        """Write the pending rows (one ``write_rows`` for all series)."""
        if self._pending:
            pending, self._pending = self._pending, []
            self.txn.write_rows(pending)

    def _name(self, base: SeriesId, base_sid: str, tf: Timeframe) -> tuple[SeriesId, str]:
        """``base`` in ``tf`` and its id text (remembered: asked once per series and batch)."""
        key = (base_sid, tf.text)
        found = self.names.get(key)
        if found is None:
            series = base.with_timeframe(tf)
            found = self.names[key] = (series, str(series))
        return found

    def derive(
        self,
        base: SeriesId,
        level: Level,
        buckets: Sequence[int],
        head: int,
        *,
        base_sid: str | None = None,
    ) -> tuple[SeriesUpdate | None, list[SystemEvent]]:
        """Derive ``tf``'s ``buckets`` (ascending) from the stored source bars; ``head``: the
        base series is settled (stored or confirmed absent) up to this minute, so a bucket
        whose last minute it reached is final even if incomplete."""
        tf, source = level.tf, level.source
        base_sid = str(base) if base_sid is None else base_sid
        if source.text == base.timeframe.text:
            source_sid = base_sid
        else:
            source_sid = self._name(base, base_sid, source)[1]
        series, sid = self._name(base, base_sid, tf)
        self._touched[sid] = series
        derived: list[tuple[Candle, bool]] = []
        runs: list[tuple[int, int]] = []  # the [start, end) of each run of buckets with bars
        before_of = functools.partial(self.recent.last_before, self.reader, source_sid)
        listing_of = functools.partial(self._listing, base_sid)
        step = max(1, SOURCE_BARS_PER_STEP * source.seconds // tf.seconds)
        long = len(buckets) > step
        for run in bucket_runs(level, buckets, step):
            run_end = level.next_open(run[-1])
            rows = self.recent.range(self.reader, source_sid, run[0], run_end)
            # the run's candles and times once (a bucket's found by bisection), and whether
            # all are complete (then no bucket's parts need a look)
            parts = list(map(_candle_of, rows))
            times = list(map(_time_of, parts))
            all_complete = all(map(_complete_of, rows))
            count = len(derived)
            i = 0
            for bucket in run:
                end = level.next_open(bucket)
                i = bisect_left(times, bucket, i)
                j = bisect_left(times, end, i)
                if j > i:
                    complete = all_complete or all(map(_complete_of, rows[i:j]))
                    bar = bucket_bar(
                        level, bucket, end, parts[i:j], complete, head, before_of, listing_of
                    )
                    if bar is not None:
                        derived.append(bar)
                i = j
            if len(derived) > count:
                runs.append((derived[count][0].candle_time, run_end))
            if long:
                # a long derivation: what the next step needs starts at its first bucket
                self.flush()
                self.recent.trim(source_sid, run_end)
        if not derived:
            return None, []
        previous_head = self.recent.head(self.reader, sid)
        old: dict[int, StoredCandle] = {}
        for start, end in runs:
            old.update(
                (s.candle.candle_time, s) for s in self.recent.range(self.reader, sid, start, end)
            )
            if long:
                self.recent.trim(sid, end)
        candles = [c for c, _ in derived]
        outcomes, writes = plan_bars(old, derived)
        self._write(sid, writes)
        incomplete_before = {t for t, s in old.items() if not s.complete}
        completed = [
            c.candle_time for c, done in derived if done and c.candle_time in incomplete_before
        ]
        events = self.fingerprint_events(sid, previous_head)
        if previous_head is None or old or candles[0].candle_time <= previous_head:
            # (bars all new above the head — the live case — call for no rebuild)
            events.extend(rebuild_events_for(sid, previous_head, candles, outcomes, completed))
        for (candle, done), outcome in zip(derived, outcomes, strict=True):
            if not done and (
                outcome is not UpsertOutcome.UNCHANGED
                or candle.candle_time not in incomplete_before
            ):
                events.append(gap_event(sid, "incomplete", candle.candle_time, candle.candle_time))
        if old:
            keep = map(operator.is_not, outcomes, itertools.repeat(UpsertOutcome.UNCHANGED))
            changed = tuple(itertools.compress(candles, keep))
        else:
            changed = tuple(candles)  # (all new)
        revised = outcomes.count(UpsertOutcome.REVISED)
        update = SeriesUpdate(sid, changed, derived=True, revised=revised) if changed else None
        return update, events

    def _listing(self, base_sid: str) -> int | None:
        """The base series' listing minute (:mod:`~tradecanvas.pipeline.bars`), read once."""
        if base_sid not in self._listings:
            self._listings[base_sid] = read_listing(self.txn, base_sid)
        return self._listings[base_sid]

    def fingerprint_events(self, series_id: str, previous_head: int | None) -> list[SystemEvent]:
        """Once per series per process: does the store hold it under other settings?"""
        if series_id in self.fingerprint_checked:
            return []
        key = f"fingerprint:{series_id}"
        if previous_head is None:
            # nothing stored: no event whatever is stored under the key (no read)
            self.txn.set_meta(key, self.fingerprint)
            return []
        stored = self.txn.get_meta(key)
        if stored == self.fingerprint:
            return []
        self.txn.set_meta(key, self.fingerprint)
        if stored is None:
            return []
        self.flush()
        first = self.txn.first_time(series_id)
        start = first if first is not None and first <= previous_head else previous_head
        return [SystemEvent(series_id, "fingerprint", start, previous_head)]

    def finish(self) -> None:
        """Let RecentBars forget what no coming commit needs: of each series this transaction
        touched, it keeps the current bucket of every timeframe built from it. Writes what
        is pending: call it last in the transaction."""
        self.flush()
        recent = self.recent
        # a live minute (a row or two per series) keeps a few more rows until the next trim,
        # cheaper than trimming every series every minute; and a minute that ends derived
        # buckets, the slowest live commit (the latency's p99), leaves its trim (2-5 ms of
        # 100-400 series) to the next transaction
        if self._written < TRIM_ROWS_PER_SERIES * len(self._touched) and (
            not recent.trim_due or (self._bars_made and recent.postpone_trim(self._touched))
        ):
            return
        for sid, series in (recent.untrimmed | self._touched).items():
            head = self.recent.head(self.reader, sid)
            if head is None:
                self.recent.trim(sid, None)
                continue
            keep_from = head
            for consumer in self.plan.consumed_by.get(series.timeframe.text, ()):
                phase = self.phase_of(series) if consumer.tf.phased else 0
                if phase is not None:
                    keep_from = min(keep_from, consumer.floor(head, phase))
            self.recent.trim(sid, keep_from)
        recent.trimmed()


# a StoredCandle's candle and complete, a Candle's time and volume (C calls in derive)
_candle_of, _complete_of = operator.itemgetter(0), operator.itemgetter(2)
_time_of = operator.attrgetter("candle_time")
_by_order = operator.itemgetter(0)  # of an (order, update) pair
_NO_BARS: Final[tuple[tuple[int, SeriesUpdate], ...]] = ()


__all__ = ["BatchCommit"]
