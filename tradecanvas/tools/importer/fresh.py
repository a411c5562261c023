"""``tradecanvas import``'s short way for a series the store does not hold yet: its minutes
and derived bars written by column, without a ``Candle`` or ``StoredCandle`` a row.

The pipeline's commit step (:class:`~tradecanvas.pipeline.apply.BatchCommit`) works for any
history: it plans each minute against what is stored and derives every bucket a batch
touches from the source bars stored by then. For the import's usual case — a series with
nothing stored (neither its minutes nor any bar derived from them), its files read in order
— everything it decides is known without a read: every minute and bar is new, and a bucket's
bar is due once the minutes reach its last minute, from the source bars seen since its start
(kept here between transactions, as ``_Open``). :class:`FreshSeries` makes the same rows,
events and counts from the columns: the bars of buckets whose parts are all there, complete
and traded by ``map``s over the columns (the rule of :func:`~tradecanvas.pipeline.derive.
aggregate`: open of the first, close of the last, high and low the max and min, volumes and
trades summed from the first part on), every other bucket by ``aggregate`` itself with the
checks of ``BatchCommit._bar`` (incomplete, empty, starting late). Tests hold it to the
pipeline's commit for any files (``tests/tools/importer/test_fresh.py``).

The sums of whole traded buckets are its own, not ``aggregate``'s: sending every bucket
through ``aggregate`` (one ``Candle`` a bucket) cost 31 % more of the importer's CPU for a
year of 1m (4.73–4.77 s → 6.18–6.38 s, ``time.process_time``, 2026-12-04), and an
``aggregate`` over columns was slower still per call; the tests keep the two equal.

It only runs while it knows the store: from a transaction that found nothing stored for the
series and all its derived series, through transactions whose minutes are all above the
last one's, all on this object. Anything else goes back to ``BatchCommit`` for the rest of
the import (:class:`~tradecanvas.tools.importer.commit.ArchiveCommitter`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable
from decimal import Decimal
from itertools import islice, repeat
from operator import add, itemgetter, lt, sub
from typing import Any, Final, NamedTuple, final

import attrs

from tradecanvas.model import MINUTE, SeriesId
from tradecanvas.pipeline.derive import aggregate, parts_in
from tradecanvas.pipeline.events import SystemEvent, gap_event
from tradecanvas.pipeline.levels import DerivationPlan, Level
from tradecanvas.store.txn import StoreTxn, plain_texts
from tradecanvas.store.types import Source
from tradecanvas.wire.kline_columns import FIELDS, KlineColumns, build

_BY_TIME: Final = itemgetter(0)


class Written(NamedTuple):
    """The candles one series changed in a transaction: how many (of them, ``revised``
    replaced a different stored value; the rest are new), the first and last time."""

    series_id: str
    derived: bool
    rows: int
    first: int
    last: int
    revised: int = 0


@attrs.frozen
class _Open:
    """A level's source bars since the start of its first bucket not yet due, and the close
    of the source bar before them (``has_before``: there is one)."""

    bars: KlineColumns
    complete: list[bool]
    before: Decimal | None = None
    has_before: bool = False


@attrs.frozen
class Fresh:
    """What a transaction of the short way did, to keep once it has committed."""

    written: list[Written]
    events: list[SystemEvent]
    head: int
    open: dict[str, _Open]
    fingerprinted: frozenset[str]


@final
class FreshSeries:
    """The short way for one base series (see the module docstring)."""

    def __init__(
        self,
        series: SeriesId,
        plan: DerivationPlan,
        phase_of: Callable[[SeriesId], int | None],
        fingerprint: str,
    ) -> None:
        self.sid = str(series)
        self.base_tf = series.timeframe.text
        # each level with its phase (None: the symbol's grid is not known, not derived)
        self.levels = [(level, phase_of(series) if level.tf.phased else 0) for level in plan.levels]
        self.names = {level.tf.text: str(series.with_timeframe(level.tf)) for level in plan.levels}
        self.fingerprint = fingerprint
        self.head: int | None = None
        self.open: dict[str, _Open] = {}
        self.fingerprinted: frozenset[str] = frozenset()

    def series_ids(self) -> list[str]:
        return [self.sid, *self.names.values()]

    def takes(self, columns: KlineColumns) -> bool:
        """``columns`` can go the short way after what it holds: every extra known, the
        minutes strictly ascending, above the last ones."""
        times = columns.times
        return (
            bool(times)
            and (self.head is None or times[0] > self.head)
            and all(map(lt, times, islice(times, 1, None)))
            and columns.all_known()
        )

    def commit(self, txn: StoreTxn, columns: KlineColumns) -> Fresh:
        """Write ``columns`` (see :meth:`takes`) and every bar it makes due; the events to
        log. Keep the result with :meth:`kept` once the transaction has committed."""
        written: list[Written] = []
        events: list[SystemEvent] = []
        fingerprinted = set(self.fingerprinted)
        times = columns.times
        head = times[-1]
        done = [True] * len(times)
        _write(txn, self.sid, "rest", columns, done)
        written.append(Written(self.sid, False, len(times), times[0], head))
        if self.sid not in fingerprinted:
            txn.set_meta(f"fingerprint:{self.sid}", self.fingerprint)
            fingerprinted.add(self.sid)
        made: dict[str, tuple[KlineColumns, list[bool]]] = {self.base_tf: (columns, done)}
        opened = dict(self.open)
        for level, phase in self.levels:
            source = made.get(level.source.text)
            if phase is None or source is None:
                continue
            was = self.open.get(level.tf.text) or _Open(KlineColumns.empty(), [])
            bars, complete, opened[level.tf.text] = _derive(level, phase, was, *source, head)
            made[level.tf.text] = (bars, complete)
            if not bars.times:
                continue
            sid = self.names[level.tf.text]
            _write(txn, sid, "derived", bars, complete)
            written.append(Written(sid, True, len(bars.times), bars.times[0], bars.times[-1]))
            if sid not in fingerprinted:
                txn.set_meta(f"fingerprint:{sid}", self.fingerprint)
                fingerprinted.add(sid)
            if not all(complete):
                events += [
                    gap_event(sid, "incomplete", t, t)
                    for t, c in zip(bars.times, complete, strict=True)
                    if not c
                ]
        return Fresh(written, events, head, opened, frozenset(fingerprinted))

    def kept(self, fresh: Fresh) -> None:
        self.head, self.open, self.fingerprinted = fresh.head, fresh.open, fresh.fingerprinted


def _write(
    txn: StoreTxn, sid: str, source: Source, bars: KlineColumns, complete: list[bool]
) -> None:
    texts = [
        plain_texts(column)
        for column in (
            bars.open,
            bars.high,
            bars.low,
            bars.close,
            bars.volume,
            bars.quote_volume,
            bars.taker_buy_base,
            bars.taker_buy_quote,
        )
    ]
    txn.write_columns(sid, source, bars.times, texts, bars.trades, complete)


def _derive(
    level: Level,
    phase: int,
    was: _Open,
    new: KlineColumns,
    new_complete: list[bool],
    head: int,
) -> tuple[KlineColumns, list[bool], _Open]:
    """The bars of ``level`` due once the minutes reach ``head``, from the source bars
    ``was`` kept and the ``new`` ones; and what to keep for the next transaction."""
    if was.bars.times:
        bars = was.bars.slice(0, len(was.bars.times))
        bars.extend(new)
        complete = was.complete + new_complete
    else:
        bars, complete = new, new_complete
    times = bars.times
    count = len(times)
    # the due buckets: (bucket, first part, end of its parts)
    due: list[tuple[int, int, int]] = []
    i = 0
    while i < count:
        bucket = level.floor(times[i], phase)
        end = level.next_open(bucket)
        if end - MINUTE > head:
            break
        j = bisect_left(times, end, i + 1)
        due.append((bucket, i, j))
        i = j
    closes = bars.close
    kept = _Open(
        bars.slice(i, count),
        complete[i:],
        closes[i - 1] if i else was.before,
        bool(i) or was.has_before,
    )
    if not due:
        return KlineColumns.empty(), [], kept
    all_complete, all_traded = all(complete), all(bars.volume)
    volumes = bars.volume
    plain: list[tuple[int, int, int]] = []
    other: list[tuple[Any, ...]] = []
    for bucket, start, stop in due:
        expected = level.parts or parts_in(level.source, level.tf, bucket)
        whole = stop - start == expected and (all_complete or all(complete[start:stop]))
        if whole and (all_traded or all(volumes[start:stop])):
            plain.append((bucket, start, stop))
            continue
        # BatchCommit._bar's checks, then aggregate itself
        all_empty = not any(volumes[start:stop])
        starts_late = times[start] > bucket
        has_before = bool(start) or was.has_before
        before = closes[start - 1] if start else was.before
        if not whole and starts_late and not has_before:
            continue  # the history starts inside this bucket: no bar (as BatchCommit)
        parts = build(stop - start, *bars.slice(start, stop).columns())
        bar = aggregate(bucket, parts, before if all_empty and has_before else None)
        other.append((*(getattr(bar, name) for name in FIELDS), whole))
    made = _plain_bars(bars, plain)
    if other:
        rows = sorted([*zip(*made.columns(), repeat(True)), *other], key=_BY_TIME)
        columns: list[list[Any]] = [list(column) for column in zip(*rows, strict=True)]
        return KlineColumns(*columns[:-1]), columns[-1], kept
    return made, [True] * len(made.times), kept


def _plain_bars(bars: KlineColumns, due: list[tuple[int, int, int]]) -> KlineColumns:
    """The bars of buckets whose parts are all there, complete and traded, by ``map``s:
    what :func:`aggregate` gives them (its sums start from the first part, in order)."""
    if not due:
        return KlineColumns.empty()
    buckets, starts, ends = (list(column) for column in zip(*due, strict=True))
    seconds = list(map(add, starts, repeat(1)))
    whole = list(map(slice, starts, ends))
    rest = list(map(slice, seconds, ends))

    def summed(column: list[Any]) -> list[Any]:
        return list(map(sum, map(column.__getitem__, rest), map(column.__getitem__, starts)))

    return KlineColumns(
        buckets,
        list(map(bars.open.__getitem__, starts)),
        list(map(max, map(bars.high.__getitem__, whole))),
        list(map(min, map(bars.low.__getitem__, whole))),
        list(map(bars.close.__getitem__, map(sub, ends, repeat(1)))),
        summed(bars.volume),
        summed(bars.quote_volume),
        summed(bars.trades),
        summed(bars.taker_buy_base),
        summed(bars.taker_buy_quote),
    )


__all__ = ["Fresh", "FreshSeries", "Written"]
