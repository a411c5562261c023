"""Between the trackers and the pipeline (pure): ClosedBatcher, FormingThrottle, MinuteCache.

Nothing here imports trio or does I/O; ``now`` is monotonic time passed in by the shell and
is used only for timeouts (batch age, the forming throttle).

- :class:`ClosedBatcher` holds released closed candles, with the unresolved-hole records
  they carry, until the committer takes them for one ``IngestPipeline.run``;
- :class:`FormingThrottle` lets at most one forming update per series through per interval;
- :class:`MinuteCache` keeps the recent base minutes that forming derived candles are built
  from.
"""

from __future__ import annotations

import contextlib
from collections.abc import Collection, Hashable, Iterable, Iterator, Sequence
from decimal import Decimal
from typing import Final, Generic, TypeVar, final

import attrs

from tradecanvas.ingest.minute_ranges import subtract_ranges
from tradecanvas.ingest.tracker import Released
from tradecanvas.model import MINUTE, Candle, SeriesId, Timeframe
from tradecanvas.pipeline.derive import aggregate

K = TypeVar("K", bound=Hashable)
Holes = tuple[tuple[int, int], ...]  # unresolved holes of a series, [start, end) open times


@attrs.frozen
class BatchItem:
    """One entry waiting for a commit since ``added_at``: a released closed candle of
    ``series``, or (``released`` None) a run of its minutes confirmed ``absent`` at the
    exchange, ``[start, end)``, which the commit records as a ``gap`` and which settles the
    derived buckets it ends (see :class:`~tradecanvas.pipeline.commit.IngestBatch`)."""

    series: SeriesId
    released: Released | None
    added_at: float
    # the series' unresolved holes to keep (in the store) once this item is committed:
    # a hole is recorded with the first candle above it, and forgotten with the last
    # candle a retry brought for it; None: no record to write
    holes: Holes | None = None
    absent: tuple[int, int] | None = None
    listed: bool = False  # the candle is the series' listing (IngestBatch.listed)

    @property
    def candle(self) -> Candle | None:
        return None if self.released is None else self.released.candle

    @property
    def time(self) -> int:
        """The open time it is ordered by: the candle's, or the first absent minute."""
        if self.released is not None:
            return self.released.candle.candle_time
        assert self.absent is not None
        return self.absent[0]


def hole_records(items: Iterable[BatchItem]) -> dict[SeriesId, Holes]:
    """The unresolved holes to store per series with a commit of ``items``: the record of
    the last item of each series that carries one (it is the newest)."""
    holes: dict[SeriesId, Holes] = {}
    for item in items:
        if item.holes is not None:
            holes[item.series] = item.holes
    return holes


# a commit of a committer that is behind takes up to this many: a live batch still
# (pipeline.commit.QUICK_BATCH), several times the default binance_ws_batch_max
CATCH_UP_SIZE: Final = 1000


@final
class ClosedBatcher:
    """Closed candles waiting for the pipeline, in release order.

    Due at once with ``flush_s`` 0 (a group commit: whatever is buffered when the
    committer is idle), else when ``max_size`` are buffered or the oldest is ``flush_s``
    old (monotonic); :class:`~tradecanvas.ingest.core.IngestCore` then flushes at once when
    nothing else is pending for its connection group. :meth:`take` returns at most
    ``max_size`` items from the front whose candles share one source (absent runs go with
    any source), so each pipeline run has one ``source`` and every series stays in time
    order — unless more than ``max_size`` are waiting: the committer is behind, and the
    commit takes up to :data:`CATCH_UP_SIZE`, so that a backlog drains in a few commits
    instead of growing by what arrives while each commit of ``max_size`` runs.
    """

    def __init__(self, max_size: int, flush_s: float) -> None:
        self.max_size = max_size
        self.catch_up_size = max(max_size, CATCH_UP_SIZE)
        self.flush_s = flush_s
        self._items: list[BatchItem] = []

    def __len__(self) -> int:
        return len(self._items)

    def add(
        self,
        series: SeriesId,
        released: Iterable[Released],
        now: float,
        holes: Holes | None = None,
    ) -> None:
        self._items.extend(BatchItem(series, r, now, holes) for r in released)

    def add_items(self, items: Iterable[BatchItem]) -> None:
        self._items.extend(items)

    def forget_holes(self, series: SeriesId, absent: Sequence[tuple[int, int]]) -> None:
        """Drop ``absent`` (minutes confirmed missing at the exchange, so never to be
        committed) from the hole records the queued items of ``series`` carry: queued
        before the retry that settled them, they would store them again."""
        if not absent:
            return
        self._items = [
            attrs.evolve(item, holes=subtract_ranges(item.holes, absent))
            if item.series == series and item.holes
            else item
            for item in self._items
        ]

    def oldest_at(self) -> float | None:
        """When the oldest entry was added (monotonic), None when empty."""
        return self._items[0].added_at if self._items else None

    def due_at(self) -> float | None:
        """Monotonic time the next flush is due (``-inf``: now), None when empty."""
        if not self._items:
            return None
        if len(self._items) >= self.max_size or self.flush_s <= 0:
            return float("-inf")
        return self._items[0].added_at + self.flush_s

    def take(self) -> list[BatchItem]:
        if not self._items:
            return []
        size = self.max_size if len(self._items) <= self.max_size else self.catch_up_size
        front = self._items[:size]
        source = next((i.released.source for i in front if i.released is not None), None)
        count = 0
        for item in front:
            if item.released is not None and item.released.source != source:
                break
            count += 1
        taken, self._items = self._items[:count], self._items[count:]
        return taken


@final
class FormingThrottle(Generic[K]):
    """At most one forming update per key every ``min_interval_s`` (monotonic).

    An update inside the interval replaces the pending one, which is emitted when the
    interval ends (so the last state before a quiet spell is never lost).
    """

    def __init__(self, min_interval_s: float) -> None:
        self.min_interval_s = min_interval_s
        self._last: dict[K, float] = {}
        self._pending: dict[K, Candle] = {}

    def offer(self, key: K, candle: Candle, now: float) -> Candle | None:
        """The candle to emit now, or None when it is kept pending."""
        last = self._last.get(key)
        if last is None or now - last >= self.min_interval_s:
            self._last[key] = now
            self._pending.pop(key, None)
            return candle
        self._pending[key] = candle
        return None

    def discard(self, key: K, upto_time: int) -> None:
        """Forget a pending update for a bar at or before ``upto_time`` (it has closed)."""
        pending = self._pending.get(key)
        if pending is not None and pending.candle_time <= upto_time:
            del self._pending[key]

    def note_sent(self, key: K, now: float) -> None:
        """An update of ``key`` went out at ``now`` by another way (a held one released):
        the interval starts again, and a pending one is superseded."""
        self._last[key] = now
        self._pending.pop(key, None)

    def next_due(self) -> float | None:
        if not self._pending:
            return None
        return min(self._last[k] + self.min_interval_s for k in self._pending)

    def due(self, now: float) -> list[tuple[K, Candle]]:
        ready = [
            (k, c) for k, c in self._pending.items() if now - self._last[k] >= self.min_interval_s
        ]
        for k, _ in ready:
            del self._pending[k]
            self._last[k] = now
        return ready


@attrs.define
class _Fold:
    """The stored minutes of one bucket in ``[bucket, upto)`` summed into one part."""

    bucket: int
    upto: int
    part: Candle | None  # None: none of those minutes is stored
    version: int  # the series' MinuteCache version it was summed at


@final
class MinuteCache:
    """The recent committed base minutes of each series, for forming derived candles.

    Keeps ``span_s`` seconds below the newest minute: the largest derived bucket plus the
    minute before it, whose close an all-empty bucket is flat at.

    :meth:`bucket_part` sums a bucket's minutes incrementally (Binance's rule is
    associative, :mod:`~tradecanvas.pipeline.derive`): a forming 1d bar costs the minutes
    added since the last one, not the 1,440 of the day. A minute stored out of order, or
    stored again with other values, starts the sums of its series over.

    It also knows where each series' stored history starts (:meth:`history_start`): the
    store's first minute, given by :meth:`start_history` at start-up, lowered by any minute
    added below it (an empty store's initial backfill). A bucket that begins before it gets
    no forming bar (:func:`~tradecanvas.ingest.forming.derived_forming`).

    History another process stored or revised comes in by :meth:`extend_history`; while the
    store is read for it, :meth:`noting_adds` notes the minutes the loop adds itself, which
    may be newer than what that read returns.
    """

    def __init__(self, span_s: int) -> None:
        self.span_s = span_s
        self._minutes: dict[SeriesId, dict[int, Candle]] = {}
        self._newest: dict[SeriesId, int] = {}
        self._oldest: dict[SeriesId, int] = {}
        self._versions: dict[SeriesId, int] = {}
        self._first: dict[SeriesId, int] = {}  # the first stored (or queued) minute
        self._listing: dict[SeriesId, int] = {}  # the first minute at Binance, when known
        self._folds: dict[tuple[SeriesId, Timeframe, int], _Fold] = {}
        self._noting: dict[SeriesId, list[set[int]]] = {}  # noting_adds blocks open

    def add(self, series: SeriesId, candles: Iterable[Candle]) -> None:
        minutes = self._minutes.setdefault(series, {})
        newest, oldest = self._newest.get(series), self._oldest.get(series)
        changed = False
        noting = self._noting.get(series)
        for c in candles:
            t = c.candle_time
            if noting is not None:
                for noted in noting:
                    noted.add(t)
            if newest is not None and t <= newest:
                old = minutes.get(t)
                if old is not c and old != c:
                    changed = True  # the sums that include it are stale
            else:
                newest = t
            if oldest is None or t < oldest:
                oldest = t
            minutes[t] = c
        if changed:
            self._versions[series] = self._versions.get(series, 0) + 1
        if newest is None or oldest is None:
            return
        first = self._first.get(series)
        if first is None or oldest < first:  # (the cached minutes are all >= the first)
            self._first[series] = oldest
        self._newest[series] = newest
        floor = newest - self.span_s
        if oldest < floor:  # trim from the oldest up: a minute or two per add, not a scan
            for t in range(oldest, floor, MINUTE):
                minutes.pop(t, None)
            oldest = floor
        self._oldest[series] = oldest

    def start_history(self, series: SeriesId, first: int | None) -> None:
        """The store's first minute of ``series`` (None: nothing stored), at start-up."""
        if first is None:
            self._first.pop(series, None)
        else:
            self._first[series] = first

    @contextlib.contextmanager
    def noting_adds(self, series: SeriesId) -> Iterator[set[int]]:
        """The times of the minutes of ``series`` :meth:`add` is given while the block runs
        (the loop's own: enqueued, or committed and added again)."""
        noted: set[int] = set()
        noting = self._noting.setdefault(series, [])
        noting.append(noted)
        try:
            yield noted
        finally:
            noting.remove(noted)
            if not noting:
                del self._noting[series]

    def newest(self, series: SeriesId) -> int | None:
        """The newest cached minute of ``series`` (None: none)."""
        return self._newest.get(series)

    def extend_history(
        self,
        series: SeriesId,
        first: int | None,
        stored: Iterable[Candle],
        own: Collection[int] = (),
    ) -> bool:
        """History another process stored or revised: ``first``, the store's first minute
        (lowers the start only; None: not read), and ``stored``, minutes of the span read
        back from the store because that process changed them. They replace the cached ones
        — except ``own``, the minutes the loop added itself since the read began
        (:meth:`noting_adds`): the read may have been answered before the loop's own write
        of them landed, so the cached one may be the newer (or, the loop told of its write
        late, the older: ``history_refresh`` reads such minutes again).

        A minute that was still waiting for the loop's commit when the read began is
        replaced too, although the loop's commit will overwrite the store's: that commit
        adds it here again (:meth:`~tradecanvas.ingest.core.IngestCore.on_committed`), and
        no forming bar of the series goes out before it does
        (:class:`~tradecanvas.ingest.ordering.FormingGate` holds them while anything of the
        series is owed). True when anything changed."""
        current = self._first.get(series)
        changed = first is not None and (current is None or first < current)
        if first is not None and changed:
            self._first[series] = first
        newest = self._newest.get(series)
        if newest is None:
            stored = list(stored)
            self.add(series, stored)
            return changed or bool(stored)
        minutes = self._minutes.setdefault(series, {})
        floor, oldest = newest - self.span_s, self._oldest.get(series, newest)
        for c in stored:
            t = c.candle_time
            if t < floor or t > newest or t in own:
                continue
            cached = minutes.get(t)
            if cached is None or cached != c:
                minutes[t] = c
                oldest = min(oldest, t)
                changed = True
        if changed:  # the sums that could include a minute added or revised are stale
            self._versions[series] = self._versions.get(series, 0) + 1
            self._oldest[series] = oldest
        return changed

    def set_listing(self, series: SeriesId, listing: int | None) -> None:
        """The series' listing minute (Binance has none before it), or None."""
        if listing is None:
            self._listing.pop(series, None)
        else:
            self._listing[series] = listing

    def starts_at_listing(self, series: SeriesId) -> bool:
        """The history starts at the series' listing: a bucket begun before it is Binance's
        first bar of the listing, of the minutes there."""
        listing = self._listing.get(series)
        return listing is not None and listing == self._first.get(series)

    def history_start(self, series: SeriesId) -> int | None:
        """The first minute of ``series`` stored or queued for the store (None: none)."""
        return self._first.get(series)

    def bucket(
        self, series: SeriesId, timeframe: Timeframe, t: int, phase: int = 0
    ) -> tuple[list[Candle], Decimal | None]:
        """Stored minutes of ``t``'s bucket before ``t``, and the close before the bucket
        (``phase``: of a phased timeframe's grid, seconds)."""
        minutes = self._minutes.get(series, {})
        start = timeframe.floor(t, phase)
        inside = [minutes[m] for m in range(start, t, MINUTE) if m in minutes]
        before = minutes.get(start - MINUTE)
        return inside, before.close if before is not None else None

    def bucket_part(
        self, series: SeriesId, timeframe: Timeframe, t: int, phase: int = 0
    ) -> tuple[list[Candle], Decimal | None]:
        """:meth:`bucket` with the minutes summed into one part (none when none is stored):
        deriving the forming bar from it gives the same bar."""
        minutes = self._minutes.get(series, {})
        start = timeframe.floor(t, phase)
        before = minutes.get(start - MINUTE)
        previous_close = before.close if before is not None else None
        version = self._versions.get(series, 0)
        key = (series, timeframe, phase)
        fold = self._folds.get(key)
        if fold is None or fold.bucket != start or fold.upto > t or fold.version != version:
            fold = _Fold(start, start, None, version)
            self._folds[key] = fold
        added = [minutes[m] for m in range(fold.upto, t, MINUTE) if m in minutes]
        if added:
            parts = added if fold.part is None else [fold.part, *added]
            fold.part = aggregate(start, parts, previous_close)
        fold.upto = max(fold.upto, t)
        return ([] if fold.part is None else [fold.part]), previous_close
