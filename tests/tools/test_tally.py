"""The counting shared by the bulk loads: new / unchanged / revised, derived bars once,
minutes as ranges."""

from __future__ import annotations

from decimal import Decimal

from tradecanvas.model import Candle
from tradecanvas.pipeline.batch import PipelineResult, SeriesUpdate
from tradecanvas.tools.tally import CommitCounts, MinuteRanges, describe_ranges

BASE = "binance:spot:BTC/USDT:1m"
BASE_1H = "binance:spot:BTC/USDT:1h"
DAY = 1_577_836_800  # 2020-01-01


def bar(t: int) -> Candle:
    one = Decimal(1)
    return Candle(t, one, one, one, one, one)


def result(*updates: SeriesUpdate) -> PipelineResult:
    return PipelineResult(updates, (), sum(len(u.candles) for u in updates), 0)


def test_a_commit_counts_what_it_changed_and_the_rest_is_unchanged() -> None:
    counts = CommitCounts()
    changed = tuple(bar(DAY + 60 * i) for i in range(4))
    # 10 offered: 4 changed, 1 of them replaced a different stored value; another series'
    # update is not this one's
    counts.add(
        BASE,
        10,
        result(
            SeriesUpdate(BASE, changed, False, 1), SeriesUpdate("x:spot:A/B:1m", changed, False)
        ),
    )
    assert (counts.new, counts.unchanged, counts.revised, counts.stored) == (3, 6, 1, 4)
    counts.add(BASE, 5, None)  # nothing committed: all were stored as they are
    counts.add_unchanged(100)  # found stored, not offered
    assert (counts.new, counts.unchanged, counts.revised, counts.offered) == (3, 111, 1, 115)
    assert counts.text() == "3 new, 111 already stored (unchanged), 1 revised"


def test_a_derived_bar_written_by_two_commits_is_counted_once() -> None:
    counts = CommitCounts()
    counts.add(BASE, 0, result(SeriesUpdate(BASE_1H, (bar(DAY), bar(DAY + 3600)), True)))
    counts.add(BASE, 0, result(SeriesUpdate(BASE_1H, (bar(DAY + 3600), bar(DAY + 7200)), True)))
    counts.add(BASE, 0, result(SeriesUpdate(BASE_1H, (), True)))
    assert counts.derived == {BASE_1H: 3}
    assert counts.stored == 0


def test_minutes_are_kept_as_ranges_and_described() -> None:
    ranges = MinuteRanges()
    for t in (0, 60, 120, 300, 600, 660):
        ranges.add(DAY + t)
    assert ranges.ranges == [(DAY, DAY + 120), (DAY + 300, DAY + 300), (DAY + 600, DAY + 660)]
    assert ranges.count == 6
    assert describe_ranges(ranges.ranges) == (
        "2020-01-01T00:00Z..2020-01-01T00:02Z (3), 2020-01-01T00:05Z,"
        " 2020-01-01T00:10Z..2020-01-01T00:11Z (2)"
    )
    assert describe_ranges(ranges.ranges, shown=1) == (
        "2020-01-01T00:00Z..2020-01-01T00:02Z (3) and 2 more ranges"
    )
