"""What goes into a pipeline run and what comes out of it, as plain data (no I/O)."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import Final, NamedTuple, final

import attrs

from tradecanvas.model import Candle, SeriesId
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.pipeline.levels import series_order
from tradecanvas.store.types import Source


class SeriesUpdate(NamedTuple):
    """The closed candles of one series that a batch made new or changed, ascending. A named
    tuple, not a frozen attrs class: a live batch makes one per series, and it costs half
    as much to build."""

    series_id: str
    candles: tuple[Candle, ...]
    derived: bool
    revised: int = 0  # of ``candles``, how many replaced a different stored value (not new)


_CANDLES = operator.itemgetter(1)  # SeriesUpdate.candles
SERIES_ID = operator.itemgetter(0)  # SeriesUpdate.series_id


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
    # base series whose first minute at Binance is known, with it: Binance has none before
    # (an empty store's first REST backfill found nothing earlier — the symbol's listing).
    # Recorded in the transaction, it gives the series' first derived buckets their bars
    # as Binance's own first bars of a listing are (pipeline/bars.py)
    listed: tuple[tuple[SeriesId, int], ...] = ()

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
        # (C-level maps: a live run has an update per series)
        return sum(map(len, map(_CANDLES, self.updates)))

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


def dedupe(candles: Iterable[Candle]) -> tuple[list[Candle], int]:
    """Ascending, one candle per time (the last one given wins); count of dropped repeats."""
    by_time: dict[int, Candle] = {}
    dropped = 0
    for candle in candles:
        if candle.candle_time in by_time:
            dropped += 1
        by_time[candle.candle_time] = candle
    return [by_time[t] for t in sorted(by_time)], dropped


# a batch's (series, candle) pair's series and candle
_SERIES, _CANDLE = operator.itemgetter(0), operator.itemgetter(1)


def group_by_series(pairs: Sequence[tuple[SeriesId, Candle]]) -> dict[SeriesId, list[Candle]]:
    """The candles of each series, in the order given (``BatchCommit`` commits them series
    by series)."""
    first = pairs[0][0] if pairs else None
    if (
        len(pairs) > 2
        and pairs[-1][0] is first
        and all(map(operator.is_, map(_SERIES, pairs), itertools.repeat(first)))
    ):
        # one series' history (the import, a backfill page): one list (C-level maps: no
        # Python a candle)
        return {pairs[0][0]: list(map(_CANDLE, pairs))}
    # a live batch holds one minute of each series: one list each, in one comprehension
    grouped = {series: [candle] for series, candle in pairs}
    if len(grouped) != len(pairs):
        grouped = {}
        for series, candle in pairs:
            found = grouped.get(series)
            if found is None:
                grouped[series] = [candle]
            else:
                found.append(candle)
    return grouped


def strictly_ascending(candles: Sequence[Candle]) -> bool:
    """Strictly ascending times (nothing for :func:`dedupe` to do), checked at C speed."""
    times = [c.candle_time for c in candles]
    return all(map(operator.lt, times, itertools.islice(times, 1, None)))


SeriesOrder = tuple[str, str, str, int]
# a base series of a batch with its candles, as BatchCommit walks them: (order key, id
# text, series, candles in the order given)
Named = tuple[SeriesOrder, str, SeriesId, Sequence[Candle]]
# SeriesNames starts over past this many SeriesId objects (a caller that makes new ones
# for every batch would otherwise grow it without end)
MAX_NAMED: Final = 8192
_SID: Final = operator.itemgetter(1)  # of a Named


@final
class SeriesNames:
    """A base series' id text and order key (``series_order``), worked out once per
    SeriesId object and kept by the object's identity: a SeriesId's hash is a Python call
    (attrs' cached hash, ~1,600 instructions), an int's is not. It holds the objects it
    names (so an id is not reused while it is kept), at most MAX_NAMED of them."""

    def __init__(self) -> None:
        self._by_object: dict[int, tuple[SeriesOrder, str, SeriesId]] = {}

    def of(self, series: SeriesId) -> tuple[SeriesOrder, str, SeriesId]:
        found = self._by_object.get(id(series))
        if found is None:
            if len(self._by_object) >= MAX_NAMED:
                self._by_object.clear()
            found = self._by_object[id(series)] = (series_order(series), str(series), series)
        return found

    def each_once(self, pairs: Sequence[tuple[SeriesId, Candle]]) -> list[Named] | None:
        """A pair a series, as a live batch has them (one minute of each): each named, in
        (order key, id text) order — distinct series never tie on both, so the sort compares
        no further — or None when a series has more than one pair (group them first)."""
        if len(pairs) > 1 and pairs[0][0] is pairs[-1][0]:
            return None  # (one series' history: the import, a backfill page)
        by_object = self._by_object
        named: list[Named] = []
        for series, candle in pairs:
            found = by_object.get(id(series))
            if found is None:
                found = self.of(series)
            named.append((found[0], found[1], series, (candle,)))
        if len(set(map(_SID, named))) != len(named):
            return None
        named.sort()
        return named

    def grouped(self, grouped: dict[SeriesId, list[Candle]]) -> list[Named]:
        """Each series of ``grouped`` named, in (order key, id text) order."""
        named: list[Named] = []
        for series, given in grouped.items():
            order, sid, _ = self.of(series)
            named.append((order, sid, series, given))
        named.sort()
        return named
