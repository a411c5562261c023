"""``tradecanvas backfill``'s pure part: the arguments, the range and its pages, the tally.

No I/O and no clock: :func:`plan_backfill` checks the arguments (``now`` is passed in) and
returns a :class:`BackfillPlan`; :meth:`BackfillPlan.chunks` are its REST pages, ending on
:func:`page_alignment` boundaries; :meth:`BackfillPlan.capped_at` ends it at Binance's
current minute; :class:`HoleFinder` says which minutes a page lacks are exchange holes to
record; :class:`BackfillTally` counts what each committed page did and writes the summary.
Raises BadInputError whose message names the argument.
"""

from __future__ import annotations

import bisect
import math
import re
from collections.abc import Collection, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Final, final

import attrs

from tradecanvas.errors import BadInputError, SeriesIdError
from tradecanvas.model import BASE_TIMEFRAME, MINUTE, Candle, SeriesId, Timeframe
from tradecanvas.pipeline.batch import PipelineResult
from tradecanvas.tools.tally import CommitCounts, MinuteRanges, describe_ranges, iso_minute
from tradecanvas.upstream.rest import KLINES_LIMIT

# A unix time above this is surely milliseconds (it would be the year 5138 in seconds).
MAX_UNIX_SECONDS: Final = 99_999_999_999
TIME_EXAMPLES: Final = "unix seconds or ISO-8601 UTC such as 2025-07-06, 2025-07-06T12:00Z"
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def parse_time(option: str, text: str) -> int:
    """``--from``/``--to``: unix seconds or ISO-8601 (UTC unless an offset is given), on a
    minute boundary. Raises BadInputError naming ``option``."""
    value = text.strip()
    if re.fullmatch(r"[0-9]+", value):
        seconds = int(value)
        if seconds > MAX_UNIX_SECONDS:
            raise BadInputError(f"{option}: {text!r} looks like milliseconds; give {TIME_EXAMPLES}")
    else:
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            raise BadInputError(f"{option}: {text!r} is not a time; give {TIME_EXAMPLES}") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        delta = moment - _EPOCH
        if delta < timedelta(0):
            raise BadInputError(f"{option}: {text!r} is before 1970; give {TIME_EXAMPLES}")
        if delta % timedelta(seconds=1):
            raise BadInputError(f"{option}: {text!r} is not on a minute boundary")
        seconds = delta // timedelta(seconds=1)
    if seconds % MINUTE:
        floor = seconds - seconds % MINUTE
        raise BadInputError(
            f"{option}: {text!r} is not on a minute boundary; use {iso_minute(floor)}"
            f" or {iso_minute(floor + MINUTE)}"
        )
    return seconds


@attrs.frozen
class BackfillPlan:
    """The base series and the half-open range ``[start, end)`` to import, in seconds."""

    series: SeriesId
    start: int
    end: int
    to_given: bool = True  # False: ``--to`` defaulted to now
    # pages end on multiples of this (seconds), so a derived bucket is seldom split across two
    # commits (see page_alignment)
    align: int = MINUTE

    @property
    def minutes(self) -> int:
        return max(0, (self.end - self.start) // MINUTE)

    @property
    def page_minutes(self) -> int:
        """One REST page per chunk: Binance's klines limit for the market."""
        return KLINES_LIMIT[self.series.market]

    def chunks(self) -> Iterator[tuple[int, int]]:
        """The pages: at most one REST call each, ending on a multiple of ``align`` when one
        lies inside the page."""
        step = self.page_minutes * MINUTE
        cursor = self.start
        while cursor < self.end:
            stop = cursor + step
            aligned = stop - stop % self.align
            if aligned > cursor:
                stop = aligned
            yield cursor, min(self.end, stop)
            cursor = stop

    def capped_at(self, exchange_minute: int) -> BackfillPlan | None:
        """The plan ending at ``exchange_minute`` (Binance's current, forming minute) if it
        reaches past it; None when the whole range lies at or after it."""
        if self.end <= exchange_minute:
            return self
        if self.start >= exchange_minute:
            return None
        return attrs.evolve(self, end=exchange_minute)

    def describe(self) -> str:
        return f"{self.series} [{iso_minute(self.start)}, {iso_minute(self.end)})"


def plan_backfill(
    series_text: str, from_text: str, to_text: str | None, now: float
) -> BackfillPlan:
    """Check the command's arguments (no I/O); ``now`` is the wall clock in unix seconds,
    used only for the default ``--to``. An explicit ``--to`` after the current minute is kept:
    :meth:`BackfillPlan.capped_at` ends the range at Binance's current minute.
    Raises BadInputError whose message names the argument.
    """
    try:
        series = SeriesId.parse(series_text)
    except SeriesIdError as exc:
        raise BadInputError(f"SERIES: {exc}") from None
    if series.timeframe.seconds != MINUTE:
        base = series.with_timeframe(BASE_TIMEFRAME)
        raise BadInputError(
            f"SERIES: {series} is not a base series; only 1m candles are imported (derived"
            f" timeframes are recomputed from them): use {base}"
        )
    start = parse_time("--from", from_text)
    current_minute = int(now) - int(now) % MINUTE
    to_given = to_text is not None
    if to_text is None:
        end = current_minute
        to_shown = f"{iso_minute(end)}, now"
    else:
        # kept as given: only Binance's clock (capped_at) says which minute is forming,
        # and this machine's clock may run behind it
        end = parse_time("--to", to_text)
        to_shown = iso_minute(end)
    if start >= end:
        raise BadInputError(
            f"--from: {iso_minute(start)} is not before --to ({to_shown}); the range is [from, to)"
        )
    return BackfillPlan(series, start, end, to_given=to_given)


def page_alignment(derived: Sequence[Timeframe], page_s: int) -> int:
    """Where pages should end so that each derived bucket is committed whole, in one page:
    a multiple of every derived timeframe if such a page fits (``1d`` covers 5m…4h, and one
    day fits a futures page), else of the longest one that fits. A bucket still split across
    two pages is finalised from its first part and corrected by the second (the store keeps
    the last write)."""
    lengths = [tf.seconds for tf in derived]
    common = math.lcm(MINUTE, *lengths)
    if common <= page_s:
        return common
    return max((s for s in lengths if s <= page_s), default=MINUTE)


@final
@attrs.define
class HoleFinder:
    """Which minutes missing from the REST pages are holes at the exchange, recorded as
    ``gap`` events (``IngestBatch.absent``) with the first candle above them.

    Every minute of the range has closed at the exchange, so a minute a page lacks is
    missing there. It is a *hole* only inside the series' history: with a candle below it
    (stored before the range — ``candle_below`` — or imported from an earlier page) and one
    above it (this page's, or a later page's: a run at a page's end waits for it). The
    minutes before a symbol's first bar are not; the ones after the last candle of the range
    are :meth:`trailing` (recorded by whoever stores the candle above them later).
    """

    candle_below: bool
    _waiting: list[tuple[int, int]] = attrs.Factory(list)

    def page(self, start: int, end: int, present: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """The page ``[start, end)`` holds the minutes ``present`` (ascending): the runs to
        record with its commit, as ``[start, end)`` ranges (a run across pages is one)."""
        runs = _merge(self._waiting + _missing_runs(start, end, present))
        if not present:
            self._waiting = runs
            return ()
        first, last = present[0], present[-1]
        below = [r for r in runs if r[1] <= first]
        inside = [r for r in runs if first < r[0] and r[1] <= last]
        self._waiting = [r for r in runs if r[0] > last]
        record = (below if self.candle_below else []) + inside
        self.candle_below = True
        return tuple(record)

    def trailing(self) -> tuple[tuple[int, int], ...]:
        """The run after the last candle so far, if there is a candle below it."""
        return tuple(self._waiting) if self.candle_below else ()


def _merge(runs: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for a, b in runs:
        if merged and merged[-1][1] == a:
            merged[-1] = (merged[-1][0], b)
        else:
            merged.append((a, b))
    return merged


def unrecorded(
    runs: Sequence[tuple[int, int]], present: Sequence[int], stored_before: Collection[int]
) -> tuple[tuple[int, int], ...]:
    """Of the hole ``runs`` a page found, those not recorded yet: a hole is recorded (as a
    ``gap`` event) with the first candle above it, so one whose candle above was already
    stored — by an earlier run of the backfill, or the daemon — is not recorded again."""
    kept = []
    for run in runs:
        above = present[bisect.bisect_left(present, run[1])]
        if above not in stored_before:
            kept.append(run)
    return tuple(kept)


def _missing_runs(start: int, end: int, present: Sequence[int]) -> list[tuple[int, int]]:
    """The minutes of ``[start, end)`` not in ``present``, as maximal ``[start, end)`` runs."""
    runs: list[tuple[int, int]] = []
    cursor = start
    for t in [*present, end]:
        if t > cursor:
            runs.append((cursor, min(t, end)))
        cursor = max(cursor, t + MINUTE)
    return runs


@final
@attrs.define
class BackfillTally:
    """What the import did so far; updated after each page.

    A page whose every minute the store already holds is not fetched again (:meth:`skip`):
    that is how an interrupted import resumes, and why a second identical run asks Binance
    only for the pages with minutes missing at the exchange.
    """

    plan: BackfillPlan
    candle_below: bool = False  # the store held a candle of the series before the range
    done_minutes: int = 0
    fetched: int = 0
    counts: CommitCounts = attrs.Factory(CommitCounts)
    absent: MinuteRanges = attrs.Factory(MinuteRanges)  # minutes missing at the exchange
    pages_fetched: int = 0
    pages_skipped: int = 0
    minutes_skipped: int = 0
    holes_recorded: int = 0  # gap events written (new holes)
    first_seen: int | None = None  # open times of the first and last candle of the range
    last_seen: int | None = None
    committed_up_to: int | None = None  # end (exclusive) of the last page done
    elapsed_s: float | None = None

    @property
    def stored(self) -> int:
        return self.counts.stored

    # the counts by their names in the summary
    @property
    def new(self) -> int:
        return self.counts.new

    @property
    def unchanged(self) -> int:
        return self.counts.unchanged

    @property
    def revised(self) -> int:
        return self.counts.revised

    @property
    def derived(self) -> dict[str, int]:
        return self.counts.derived

    @property
    def missing(self) -> int:
        return self.absent.count

    @property
    def missing_ranges(self) -> list[tuple[int, int]]:
        """The minutes missing at the exchange, as (first, last) open times."""
        return self.absent.ranges

    @property
    def complete(self) -> bool:
        return self.done_minutes >= self.plan.minutes

    def _seen(self, first: int, last: int) -> None:
        if self.first_seen is None:
            self.first_seen = first
        self.last_seen = last

    def record(
        self,
        start: int,
        end: int,
        fetched: Sequence[Candle],
        result: PipelineResult | None,
        *,
        holes_recorded: int = 0,
    ) -> None:
        """Account for the fetched page ``[start, end)``: ``fetched`` from REST, ``result``
        of the commit (None: nothing to commit)."""
        self.counts.add(str(self.plan.series), len(fetched), result)
        self.fetched += len(fetched)
        self.pages_fetched += 1
        self.holes_recorded += holes_recorded
        present = {c.candle_time for c in fetched}
        for t in range(start, end, MINUTE):
            if t not in present:
                self.absent.add(t)
        if fetched:
            self._seen(fetched[0].candle_time, fetched[-1].candle_time)
        self._done(start, end)

    def skip(self, start: int, end: int) -> None:
        """The page ``[start, end)`` was stored whole already: not fetched again."""
        minutes = (end - start) // MINUTE
        self.counts.add_unchanged(minutes)
        self.pages_skipped += 1
        self.minutes_skipped += minutes
        self._seen(start, end - MINUTE)
        self._done(start, end)

    def _done(self, start: int, end: int) -> None:
        self.done_minutes += (end - start) // MINUTE
        self.committed_up_to = end

    def holes(self) -> dict[str, list[tuple[int, int]]]:
        """The missing minutes as ranges, by kind: ``before`` the series' first candle (not
        holes), ``holes`` inside its history, ``after`` the last candle of the range."""
        kinds: dict[str, list[tuple[int, int]]] = {"before": [], "holes": [], "after": []}
        for a, b in self.absent.ranges:
            if self.first_seen is None or self.last_seen is None:
                kind = "after" if self.candle_below else "before"
            elif b < self.first_seen:
                kind = "holes" if self.candle_below else "before"
            elif a > self.last_seen:
                kind = "after"
            else:
                kind = "holes"
            kinds[kind].append((a, b))
        return kinds

    def summary_lines(self) -> list[str]:
        """The summary printed on stdout."""
        head = f"{self.plan.describe()}: {self.plan.minutes:,} minutes requested"
        if not self.complete:
            head += f", {self.done_minutes:,} done"
        lines = [
            f"{head}, {self.fetched:,} fetched, {self.counts.text()},"
            f" {self.missing:,} missing at the exchange"
        ]
        derived = self.counts.derived
        for sid in sorted(derived, key=_by_length):
            count = derived[sid]
            lines.append(f"{sid}: {count:,} derived bar{'' if count == 1 else 's'} written")
        holes = self.holes()
        for kind, label in (
            ("holes", f"holes at the exchange ({self.holes_recorded:,} new gap events)"),
            ("after", "missing after the last candle (a gap once a candle above is stored)"),
            ("before", "missing before the first candle (not holes: no earlier bar)"),
        ):
            if holes[kind]:
                lines.append(f"{label}: {describe_ranges(holes[kind])}")
        if self.minutes_skipped:
            lines.append(
                f"resumed: {self.minutes_skipped:,} minutes in {self.pages_skipped:,} pages were"
                " stored already and not fetched again"
            )
        if self.elapsed_s is not None:
            lines.append(f"took {self.elapsed_s:.1f} s, {self.pages_fetched:,} REST pages")
        if self.done_minutes and self.stored == 0 and self.holes_recorded == 0:
            lines.append(
                "nothing changed: the store already held every candle Binance has for"
                + (" this range" if self.complete else " the part done")
            )
        return lines

    def committed_text(self) -> str:
        """For a stop before the end: how far the import got."""
        if self.committed_up_to is None:
            return "nothing committed"
        return (
            f"committed up to {iso_minute(self.committed_up_to)} (from"
            f" {iso_minute(self.plan.start)}); that stays stored, run the same command again"
            " to finish"
        )


def _by_length(series_id: str) -> tuple[str, int]:
    """Series in the order a chart lists them: per symbol, shortest timeframe first."""
    sid = SeriesId.parse(series_id)
    return str(sid.with_timeframe(BASE_TIMEFRAME)), sid.timeframe.seconds
