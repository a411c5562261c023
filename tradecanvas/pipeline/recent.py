"""RecentBars: a write-through cache of each series' recent stored bars, so the commit of a
live minute derives its buckets without reading back what earlier commits wrote. Sans-IO: the
store is reached through the transaction handed in (:class:`BarReader`).

What it holds is *exact knowledge*: per series, spans of ``candle_time`` in which it knows every
stored row (and so also where there is none), and the series' head. Above a known head nothing
is stored, so a new minute needs no read to know it is new. A read fills only the parts of the
asked range it does not know; every row the pipeline writes is put in; :meth:`trim` forgets
what no coming commit needs (the pipeline keeps each series' current bucket of the timeframes
built from it). Knowledge is only ever dropped, never guessed, so a miss costs a read and
nothing else.

Heads: :meth:`learn_heads` asks the reader for the heads of many series in one read
(``heads_of``: a probe of the primary key per series, never a scan), and a series it does
not name has nothing stored; the pipeline asks it for every series a commit may touch (the
batch's series and the series derived from them) the first time one of them is not known,
so the derivation of a commit group costs no read per series. :meth:`head` of a series still
not known reads that one head.

Coherence: the pipeline calls :meth:`begin` at the start of each of its write transactions
with the transaction's ``sequence``; unless it is exactly one more than the previous one
(nothing else wrote in between: no other caller of the store, no other process), everything
is forgotten. A failed transaction must call :meth:`forget` (what it put in was rolled back).
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Final, Protocol, final

from tradecanvas.model import SeriesId
from tradecanvas.store.types import StoredCandle

# a row's candle_time (a C call: a history's batch has thousands)
_ROW_TIME: Final = operator.attrgetter("candle.candle_time")

# a lower bound of every candle_time (they are unix seconds, never negative)
_LOW: Final = -(2**62)
_LO: Final = operator.itemgetter(0)
_HI: Final = operator.itemgetter(1)
# the most rows kept per series after a trim: a bound on memory whatever the timeframes
MAX_ROWS_PER_SERIES: Final = 1500
TRIM_EVERY: Final = 8


class BarReader(Protocol):
    """The reads RecentBars makes, as the store's transaction (StoreTxn) offers them."""

    def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]: ...

    def last_before(self, series_id: str, t: int) -> StoredCandle | None: ...

    def head_time(self, series_id: str) -> int | None: ...

    def heads_of(self, series_ids: Collection[str]) -> dict[str, int]:
        """The head of each of ``series_ids`` that has a stored row, in one read."""
        ...


@final
class _Known:
    __slots__ = ("head", "head_known", "rows", "spans", "times")

    def __init__(self) -> None:
        self.times: list[int] = []  # ascending, the keys of ``rows``
        self.rows: dict[int, StoredCandle] = {}
        self.spans: list[tuple[int, int]] = []  # ascending, disjoint, not touching: [lo, hi)
        self.head: int | None = None
        self.head_known = False

    def above(self) -> int | None:
        """Where the head's knowledge starts: nothing is stored at or above this time."""
        if not self.head_known:
            return None
        return _LOW if self.head is None else self.head + 1

    def gaps(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of [start, end) this series does not know."""
        above = self.above()
        if above is not None:
            end = min(end, max(start, above))
        gaps: list[tuple[int, int]] = []
        at = start
        spans = self.spans
        # from the first span ending after ``start`` (the ends ascend too): a history written
        # below the head is a span a row, so no walk from the oldest
        for k in range(bisect.bisect_right(spans, start, key=_HI), len(spans)):
            lo, hi = spans[k]
            if lo >= end:
                break
            if lo > at:
                gaps.append((at, lo))
            at = max(at, hi)
            if at >= end:
                break
        if at < end:
            gaps.append((at, end))
        return gaps

    def cover(self, lo: int, hi: int) -> None:
        if lo >= hi:
            return
        spans = self.spans
        if spans and spans[-1][0] <= lo <= spans[-1][1]:  # extends the newest span (usual)
            if hi > spans[-1][1]:
                spans[-1] = (spans[-1][0], hi)
            return
        # the spans it overlaps or touches, [first, stop), become one (bisection: spans
        # a row each, below the head, made this a walk of all of them a row)
        first = bisect.bisect_left(spans, lo, key=_HI)
        stop = bisect.bisect_right(spans, hi, key=_LO)
        if first < stop:
            lo, hi = min(lo, spans[first][0]), max(hi, spans[stop - 1][1])
        spans[first:stop] = [(lo, hi)]

    def above_head(self, t: int, row: StoredCandle) -> None:
        """Put ``row``, at ``t`` above the known head (not None): ``t`` is the head now."""
        head = self.head
        assert head is not None and t > head
        spans = self.spans
        # (usually the newest span ends just above the head: it now ends above ``t``)
        if spans and (last := spans[-1])[1] == head + 1:
            spans[-1] = (last[0], t + 1)
        else:
            self.cover(head + 1, t + 1)
        self.head = t
        self.times.append(t)
        self.rows[t] = row

    def put(self, row: StoredCandle) -> None:
        t = row.candle.candle_time
        if t not in self.rows:
            if not self.times or t > self.times[-1]:
                self.times.append(t)
            else:
                bisect.insort(self.times, t)
        self.rows[t] = row


@final
class RecentBars:
    """Per series id: the stored rows of recently used spans and the head (see the module
    docstring). Used from one write transaction at a time; never raises on its own."""

    def __init__(self) -> None:
        self._series: dict[str, _Known] = {}
        self._sequence: int | None = None
        self._transactions = 0
        self._trimmed_at = 0  # the transaction of the last trim
        # series a transaction touched whose due trim waited for the next (postpone_trim)
        self.untrimmed: dict[str, SeriesId] = {}
        self.reads = 0  # store reads made to fill gaps (tests and benchmarks look)

    def begin(self, sequence: int) -> None:
        """A write transaction numbered ``sequence`` starts (see ``StoreTxn.sequence``)."""
        if self._sequence is None or sequence != self._sequence + 1:
            self._series.clear()
        self._sequence = sequence
        self._transactions += 1

    @property
    def trim_due(self) -> bool:
        """TRIM_EVERY transactions after the last (:meth:`trimmed`) the pipeline trims what
        it touched (in between, a series keeps a few more rows than it needs)."""
        return self._transactions - self._trimmed_at >= TRIM_EVERY

    def postpone_trim(self, touched: Mapping[str, SeriesId]) -> bool:
        """Let the next transaction's trim take ``touched`` too, once: True when postponed,
        False when a trim already waited (trim now)."""
        if self.untrimmed:
            return False
        self.untrimmed.update(touched)
        return True

    def trimmed(self) -> None:
        """The pipeline trimmed what it touched and what waited."""
        self._trimmed_at = self._transactions
        self.untrimmed.clear()

    def holds_complete(self, series_id: str, t: int) -> bool:
        """Known to be stored at ``t`` with its ``complete`` mark (no read: False when not
        known)."""
        known = self._series.get(series_id)
        row = None if known is None else known.rows.get(t)
        return row is not None and row.complete

    def forget(self) -> None:
        """Drop everything (a transaction failed: what it put in was rolled back)."""
        self._series.clear()
        self._sequence = None

    def _known(self, series_id: str) -> _Known:
        known = self._series.get(series_id)
        if known is None:
            known = self._series[series_id] = _Known()
        return known

    def head(self, reader: BarReader, series_id: str) -> int | None:
        """The newest stored ``candle_time`` of the series."""
        known = self._known(series_id)
        if not known.head_known:
            self.reads += 1
            known.head = reader.head_time(series_id)
            known.head_known = True
        return known.head

    def knows_head(self, series_id: str) -> bool:
        """The series' head is known (:meth:`head` needs no read)."""
        known = self._series.get(series_id)
        return known is not None and known.head_known

    def learn_heads(self, reader: BarReader, series_ids: Iterable[str]) -> None:
        """Know the heads of ``series_ids``: those not known yet in one read."""
        wanted = [sid for sid in series_ids if not self.knows_head(sid)]
        if not wanted:
            return
        self.reads += 1
        heads = reader.heads_of(wanted)
        for sid in wanted:
            known = self._known(sid)
            known.head = heads.get(sid)
            known.head_known = True

    def range(self, reader: BarReader, series_id: str, start: int, end: int) -> list[StoredCandle]:
        """Stored rows with ``start <= candle_time < end``, ascending; reads only the gaps."""
        known = self._known(series_id)
        for lo, hi in known.gaps(start, end):
            self.reads += 1
            for row in reader.range(series_id, lo, hi):
                known.put(row)
            known.cover(lo, hi)
        times = known.times
        i = bisect.bisect_left(times, start)
        j = bisect.bisect_left(times, end, i)
        rows = known.rows
        return [rows[t] for t in times[i:j]]

    def last_before(self, reader: BarReader, series_id: str, t: int) -> StoredCandle | None:
        """The newest stored row with ``candle_time < t``."""
        known = self._known(series_id)
        i = bisect.bisect_left(known.times, t)
        if i > 0:
            below = known.times[i - 1]
            if not known.gaps(below, t):
                return known.rows[below]
        elif not known.gaps(_LOW, t):
            return None
        self.reads += 1
        row = reader.last_before(series_id, t)
        if row is None:
            known.cover(_LOW, t)
        else:
            known.put(row)
            known.cover(row.candle.candle_time, t)
        return row

    def known_range(self, series_id: str, start: int, end: int) -> list[StoredCandle] | None:
        """:meth:`range` when it needs no read (every part of [start, end) known), else None."""
        known = self._series.get(series_id)
        if known is None:
            return None
        spans = known.spans
        # the usual case first (a live bucket): from inside the newest span, which reaches
        # the head (or ``end``): nothing is stored above the head
        if spans:
            lo, hi = spans[-1]
            head = known.head
            inside = lo <= start and (
                end <= hi or (known.head_known and (head is None or hi > head))
            )
        else:
            inside = False
        if not inside and known.gaps(start, end):
            return None
        times = known.times
        i = bisect.bisect_left(times, start)
        return list(map(known.rows.__getitem__, times[i : bisect.bisect_left(times, end, i)]))

    def known_head(self, series_id: str) -> int | None:
        """The series' head when it is known and something is stored (no read), else None."""
        known = self._series.get(series_id)
        return None if known is None or not known.head_known else known.head

    def live(self, series_id: str) -> _Known | None:
        """The series' record when its head is known and something is stored (the case of
        :meth:`known_head`), for the live minute: it reads ``head`` and puts a row above it
        with ``above_head`` (:meth:`wrote_above_head` without a second lookup)."""
        known = self._series.get(series_id)
        if known is None or known.head is None or not known.head_known:
            return None
        return known

    def wrote_above_head(self, series_id: str, row: StoredCandle) -> None:
        """:meth:`wrote` for one row above the series' known head (:meth:`known_head`)."""
        self._series[series_id].above_head(row.candle.candle_time, row)

    def wrote(self, series_id: str, rows: Sequence[StoredCandle]) -> None:
        """``rows`` are now stored as given (the transaction wrote them)."""
        if not rows:
            return
        known = self._known(series_id)
        head = known.head
        new_times = list(map(_ROW_TIME, rows))
        newest = max(new_times)
        if known.head_known and (head is None or newest > head):
            # nothing was stored above the old head: all of it up to the newest is known now
            known.cover(_LOW if head is None else head + 1, newest + 1)
            known.head = newest
        times = known.times
        stored = known.rows
        first = new_times[0]
        if (
            (not times or first > times[-1])
            and (first > head if head is not None else known.head_known)
            and all(map(operator.lt, new_times, new_times[1:]))
        ):
            # a history's rows: ascending, after every row kept and above the old head (or
            # all covered just now), so none is known yet and none needs a cover
            times.extend(new_times)
            stored.update(zip(new_times, rows, strict=True))
            return
        for row in rows:
            t = row.candle.candle_time
            if t not in stored:
                if not times or t > times[-1]:
                    times.append(t)
                else:
                    bisect.insort(times, t)
                # below the old head: known only if it was read first
                if (head is None or t <= head) and known.gaps(t, t + 1):
                    known.cover(t, t + 1)
            stored[t] = row

    def trim(self, series_id: str, keep_from: int | None) -> None:
        """Forget the series' rows before ``keep_from`` (all of them for None), and all but
        the newest MAX_ROWS_PER_SERIES; the head stays known."""
        known = self._series.get(series_id)
        if known is None:
            return
        times = known.times
        if (
            keep_from is not None
            and len(times) <= MAX_ROWS_PER_SERIES
            and (not times or times[0] >= keep_from)
            and (not known.spans or known.spans[0][0] >= keep_from)
        ):
            return  # nothing to forget
        if keep_from is None:
            cut, floor = len(times), None
        else:
            cut, floor = bisect.bisect_left(times, keep_from), keep_from
        if len(times) - cut > MAX_ROWS_PER_SERIES:
            cut = len(times) - MAX_ROWS_PER_SERIES
            floor = times[cut]
        for t in times[:cut]:
            del known.rows[t]
        del times[:cut]
        if floor is None:
            known.spans = []
        else:
            known.spans = [(max(lo, floor), hi) for lo, hi in known.spans if hi > floor]

    def cached_rows(self, series_id: str) -> Sequence[int]:
        """The times of the rows held for the series (tests)."""
        known = self._series.get(series_id)
        return () if known is None else tuple(known.times)


@final
class FlushingReader:
    """A transaction's reads (a :class:`BarReader`, the store's ``StoreTxn``), each after
    ``flush`` (the commit's pending writes): what RecentBars reads through in a commit."""

    def __init__(self, reader: BarReader, flush: Callable[[], None]) -> None:
        self._reader = reader
        self._flush = flush

    def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        self._flush()
        return self._reader.range(series_id, start, end)

    def last_before(self, series_id: str, t: int) -> StoredCandle | None:
        self._flush()
        return self._reader.last_before(series_id, t)

    def head_time(self, series_id: str) -> int | None:
        self._flush()
        return self._reader.head_time(series_id)

    def heads_of(self, series_ids: Collection[str]) -> dict[str, int]:
        self._flush()
        return self._reader.heads_of(series_ids)
