"""What bulk loads did to a series, counted (pure: no I/O, no clock).

Shared by the commands that load history in bulk (``backfill``, and ``import`` can use it):
:class:`CommitCounts` counts the base candles each commit made new, left unchanged or revised
and the distinct derived bars it wrote, from the commit's
:class:`~tradecanvas.pipeline.batch.PipelineResult`; :class:`MinuteRanges` keeps minutes (such
as the ones missing at the exchange) as ranges; :func:`describe_ranges` shows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final, final

import attrs

from tradecanvas.model import MINUTE
from tradecanvas.pipeline.batch import PipelineResult

RANGES_SHOWN: Final = 10


def iso_minute(t: int) -> str:
    """``2025-07-06T12:00Z``: how times are shown to the user."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%MZ")


@final
@attrs.define
class CommitCounts:
    """The base candles of one series offered to commits, by what became of them, and the
    distinct derived bars written (a bar rewritten by the next commit — its bucket split
    across two — is counted once)."""

    new: int = 0
    unchanged: int = 0
    revised: int = 0
    derived: dict[str, int] = attrs.Factory(dict)  # derived series → distinct bars written
    _last_derived: dict[str, int] = attrs.Factory(dict)  # derived series → last bar written

    @property
    def stored(self) -> int:
        """Candles the store did not hold as they are (new or revised)."""
        return self.new + self.revised

    @property
    def offered(self) -> int:
        return self.new + self.unchanged + self.revised

    def add(self, series_id: str, offered: int, result: PipelineResult | None) -> None:
        """``offered`` candles of the base series ``series_id`` went into a commit that gave
        ``result`` (None: nothing was committed, they all were stored as they are)."""
        changed = revised = 0
        if result is not None:
            for update in result.updates:
                if update.derived:
                    self._count_derived(update.series_id, [c.candle_time for c in update.candles])
                elif update.series_id == series_id:
                    changed += len(update.candles)
                    revised += update.revised
        self.new += changed - revised
        self.revised += revised
        self.unchanged += offered - changed

    def add_unchanged(self, count: int) -> None:
        """``count`` candles found stored already and not offered again."""
        self.unchanged += count

    def _count_derived(self, series_id: str, times: Sequence[int]) -> None:
        if not times:
            return
        again = 1 if self._last_derived.get(series_id) == times[0] else 0
        self.derived[series_id] = self.derived.get(series_id, 0) + len(times) - again
        self._last_derived[series_id] = times[-1]

    def text(self) -> str:
        return (
            f"{self.new:,} new, {self.unchanged:,} already stored (unchanged),"
            f" {self.revised:,} revised"
        )


@final
@attrs.define
class MinuteRanges:
    """Minutes added in ascending order, kept as ``(first, last)`` ranges of open times."""

    ranges: list[tuple[int, int]] = attrs.Factory(list)
    count: int = 0

    def add(self, t: int) -> None:
        self.count += 1
        if self.ranges and self.ranges[-1][1] == t - MINUTE:
            self.ranges[-1] = (self.ranges[-1][0], t)
        else:
            self.ranges.append((t, t))


def describe_ranges(ranges: Sequence[tuple[int, int]], shown: int = RANGES_SHOWN) -> str:
    """``2023-08-16T01:40Z..2023-08-16T01:42Z (3), 2023-08-16T05:00Z and 2 more ranges``"""
    parts = [
        f"{iso_minute(a)}..{iso_minute(b)} ({(b - a) // MINUTE + 1})" if b > a else iso_minute(a)
        for a, b in ranges[:shown]
    ]
    more = len(ranges) - shown
    return ", ".join(parts) + (f" and {more} more ranges" if more > 0 else "")
