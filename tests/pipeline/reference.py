"""The commit and derivation as they were before the fast path (issue 14), kept as the
reference the fast path is held to: every read goes to the store, one candle at a time, with
nothing cached. Plain and slow on purpose; only the tests use it."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

import attrs

from tradecanvas.model import MINUTE, Candle, SeriesId, Timeframe, derivation_sources
from tradecanvas.pipeline.batch import IngestBatch, SeriesUpdate, dedupe
from tradecanvas.pipeline.derive import Part, derive_parts, parts_in
from tradecanvas.pipeline.events import SystemEvent, gap_event, rebuild_events_for
from tradecanvas.store.txn import _COLUMNS, StoreTxn, select_candles
from tradecanvas.store.types import Source, StoredCandle, UpsertOutcome


def upsert_one_by_one(
    conn: sqlite3.Connection, series_id: str, candles: Sequence[Candle], source: Source,
    complete: bool, rewritten: list[int] | None = None,
) -> list[UpsertOutcome]:  # fmt: skip
    """The store's upsert as it was: a read, then one statement per candle. The times of the
    rows it wrote go to ``rewritten`` (an unchanged candle's too, when it gained extras or
    its ``complete`` mark changed)."""
    outcomes = []
    for candle in candles:
        rows = select_candles(conn, "candle_time = ?", (series_id, candle.candle_time))
        old = rows[0] if rows else None
        row: StoredCandle | None = None
        if old is None:
            outcome, row = UpsertOutcome.NEW, StoredCandle(candle, source, complete)
        elif not old.candle.same_values(candle):
            outcome, row = UpsertOutcome.REVISED, StoredCandle(candle, source, complete)
        else:
            outcome = UpsertOutcome.UNCHANGED
            gains = any(
                getattr(old.candle, n) is None and getattr(candle, n) is not None for n in _EXTRAS
            )
            if old.complete != complete or gains:
                merged = attrs.evolve(
                    old.candle,
                    **{n: getattr(candle, n) for n in _EXTRAS if getattr(old.candle, n) is None},
                )
                row = StoredCandle(merged, old.source, complete)
        outcomes.append(outcome)
        if row is not None:
            if rewritten is not None:
                rewritten.append(candle.candle_time)
            c = row.candle
            conn.execute(
                f"INSERT OR REPLACE INTO candles (series_id, {_COLUMNS})"  # noqa: S608
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (series_id, c.candle_time, *(_text(getattr(c, n)) for n in _DECIMALS[:5]),
                 _text(c.quote_volume), c.trades, _text(c.taker_buy_base),
                 _text(c.taker_buy_quote), row.source, int(row.complete)),
            )  # fmt: skip
    return outcomes


_DECIMALS = ("open", "high", "low", "close", "volume")
_EXTRAS = ("quote_volume", "trades", "taker_buy_base", "taker_buy_quote")


def _text(value: object) -> str | None:
    return None if value is None else format(value, "f")


class ReferenceCommit:
    """``IngestPipeline._run_in_txn`` before issue 14 (without the event log)."""

    def __init__(
        self,
        derived: Sequence[Timeframe],
        phase_of: Callable[[SeriesId], int | None],
        fingerprint: str,
    ) -> None:
        self.derived_timeframes = tuple(derived)
        self.sources = derivation_sources(self.derived_timeframes)
        self._order = {tf: i for i, tf in enumerate(self.derived_timeframes)}
        self.phase_of = phase_of
        self.fingerprint = fingerprint
        self.fingerprint_checked: set[str] = set()

    def run(
        self, conn: sqlite3.Connection, batch: IngestBatch
    ) -> tuple[list[SeriesUpdate], list[SystemEvent], int]:
        txn = StoreTxn(conn)
        grouped: dict[SeriesId, list[Candle]] = {}
        for series, candle in batch.candles:
            grouped.setdefault(series, []).append(candle)
        updates: list[SeriesUpdate] = []
        derived_updates: list[SeriesUpdate] = []
        events: list[SystemEvent] = []
        dropped_total = 0
        for key, value in batch.meta:
            txn.set_meta(key, value)
        for series, t in batch.listed:  # a listing, unless a minute below it is stored
            first = txn.first_time(str(series))
            if first is None or first >= t:
                txn.set_meta(f"listed:{series}", str(t))
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
            rewritten: list[int] = []  # the minutes whose row changed, values or extras
            if candles:
                outcomes = upsert_one_by_one(conn, sid, candles, batch.source, True, rewritten)
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
            if head is None or not (rewritten or holes):
                continue
            settled = max([head] + [end - MINUTE for _, end in holes])
            series_updates: list[tuple[int, SeriesUpdate]] = []
            for tf in sorted(self.derived_timeframes):
                phase = self.phase_of(series) if tf.phased else 0
                if phase is None:
                    continue
                # a minute that only gained extras changes no value, but its bars' extras
                buckets = {tf.floor(t, phase) for t in rewritten}
                if previous_head is not None and head > previous_head:
                    buckets.add(tf.floor(previous_head, phase))
                for start, end in holes:
                    buckets.update(tf.floor(t, phase) for t in (start - MINUTE, end - MINUTE))
                update, tf_events = self.derive(conn, series, tf, sorted(buckets), settled)
                events.extend(tf_events)
                if update is not None:
                    series_updates.append((self._order[tf], update))
            derived_updates.extend(u for _, u in sorted(series_updates, key=lambda x: x[0]))
        self.fingerprint_checked.update(u.series_id for u in updates + derived_updates)
        return updates + derived_updates, events, dropped_total

    def derive(
        self, conn: sqlite3.Connection, base: SeriesId, tf: Timeframe, buckets: Sequence[int],
        head: int,
    ) -> tuple[SeriesUpdate | None, list[SystemEvent]]:  # fmt: skip
        txn = StoreTxn(conn)
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
            stored: list[StoredCandle] = txn.range(source_sid, bucket, end)
            if not stored:
                continue
            parts = [Part(s.candle, s.complete) for s in stored]
            result = derive_parts(bucket, parts_in(source, tf, bucket), parts, None)
            assert result is not None
            if not result.complete and head < end - MINUTE:
                continue
            before = txn.last_before(source_sid, bucket)
            first = stored[0].candle.candle_time
            if not result.complete and before is None and first > bucket:
                # the history starts inside the bucket: a bar only if the listing does too,
                # of the source bars from the listing's on
                listed = txn.get_meta(f"listed:{base}")
                start = None if listed is None else source.floor(int(listed))
                if start is None or not bucket <= start <= first:
                    continue
                result = derive_parts(bucket, (end - start) // source.seconds, parts, None)
                assert result is not None
            if before is not None and all(s.candle.volume == 0 for s in stored):
                result = derive_parts(
                    bucket, parts_in(source, tf, bucket), parts, before.candle.close
                )
                assert result is not None
            derived.append((result.candle, result.complete))
        if not derived:
            return None, []
        candles = [c for c, _ in derived]
        outcomes: list[UpsertOutcome] = []
        for candle, complete in derived:
            outcomes.extend(upsert_one_by_one(conn, sid, [candle], "derived", complete))
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
        if series_id in self.fingerprint_checked:
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
