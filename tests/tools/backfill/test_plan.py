"""``tradecanvas backfill``'s pure part: times, the plan and its pages, the tally."""

from __future__ import annotations

from decimal import Decimal

import pytest

from tradecanvas.errors import BadInputError
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import PipelineResult, SeriesUpdate
from tradecanvas.tools.backfill import (
    BackfillPlan,
    BackfillTally,
    HoleFinder,
    page_alignment,
    parse_time,
    plan_backfill,
    unrecorded,
)

BASE = "binance:futures:BTC/USDT:1m"
BASE_5M = "binance:futures:BTC/USDT:5m"
DAY = 1_692_144_000  # 2023-08-16


def test_times_are_unix_seconds_or_iso_utc_on_a_minute() -> None:
    for text in ("1692144000", "2023-08-16", "2023-08-16T00:00", "2023-08-16T00:00Z"):
        assert parse_time("--from", text) == DAY
    assert parse_time("--from", "2023-08-16T02:00+02:00") == DAY
    assert parse_time("--to", "2023-08-16 00:01:00") == DAY + 60
    for bad in ("", "-60", "2023-08-16T00:00:00.5", "1692144001", "16.9e8", "1969-12-31"):
        with pytest.raises(BadInputError, match=r"^--from: "):
            parse_time("--from", bad)


def test_plan_defaults_to_now_and_never_reaches_the_forming_minute() -> None:
    now = DAY + 3600 + 42.5
    plan = plan_backfill(BASE, str(DAY), None, now)
    assert (plan.start, plan.end, plan.to_given) == (DAY, DAY + 3600, False)
    # an explicit --to is left to Binance's clock (cap_at_exchange), not this machine's
    assert plan_backfill(BASE, str(DAY), str(DAY + 7200), now).end == DAY + 7200
    with pytest.raises(BadInputError, match=r"^--from: .* is not before --to"):
        plan_backfill(BASE, str(DAY + 3600), None, now)


def test_pages_follow_binance_limits() -> None:
    futures = BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 3100 * 60)
    assert [(b - a) // 60 for a, b in futures.chunks()] == [1500, 1500, 100]
    spot = BackfillPlan(SeriesId.parse("binance:spot:BTC/USDT:1m"), DAY, DAY + 2000 * 60)
    assert [(b - a) // 60 for a, b in spot.chunks()] == [1000, 1000]


def test_pages_align_to_the_derived_timeframes_when_they_fit() -> None:
    tfs = [Timeframe.parse(t) for t in ("5m", "15m", "1h", "4h", "1d")]
    futures_page, spot_page = 1500 * 60, 1000 * 60
    assert page_alignment(tfs, futures_page) == 86400  # a day fits a futures page
    assert page_alignment(tfs, spot_page) == 4 * 3600  # not a spot page: the longest that does
    assert page_alignment([Timeframe.parse("5m")], spot_page) == 300
    assert page_alignment([], spot_page) == 60
    plan = BackfillPlan(SeriesId.parse(BASE), DAY + 600, DAY + 3 * 86400, align=86400)
    chunks = list(plan.chunks())
    assert chunks[0] == (DAY + 600, DAY + 86400)  # the first page ends at the next midnight
    assert all(b - a <= 1500 * 60 for a, b in chunks)
    assert [a for a, _ in chunks[1:]] == [b for _, b in chunks[:-1]]  # contiguous
    assert chunks[-1][1] == DAY + 3 * 86400
    assert all(b % 86400 == 0 for _, b in chunks)


def test_summary_names_what_was_stopped() -> None:
    tally = BackfillTally(BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 3000 * 60))
    assert tally.committed_text() == "nothing committed"
    tally.record(DAY, DAY + 120, [], None)
    assert tally.committed_text().startswith("committed up to 2023-08-16T00:02Z")
    assert "2 done" in tally.summary_lines()[0]
    assert (
        "missing before the first candle (not holes: no earlier bar):"
        " 2023-08-16T00:00Z..2023-08-16T00:01Z (2)" in tally.summary_lines()
    )


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            [BASE, "2023-08-16T00:00:30Z", "2023-08-16T01:00Z"],
            "--from: '2023-08-16T00:00:30Z' is not on a minute boundary",
            id="unaligned-from",
        ),
        pytest.param([BASE, str(DAY), str(DAY + 90)], "--to: ", id="unaligned-to"),
        pytest.param(
            [BASE, "2023-08-16T01:00Z", "2023-08-16T01:00Z"],
            "--from: 2023-08-16T01:00Z is not before --to",
            id="from-not-before-to",
        ),
        pytest.param(
            [BASE_5M, "2023-08-16", "2023-08-17"],
            "SERIES: binance:futures:BTC/USDT:5m is not a base series",
            id="derived-series",
        ),
        pytest.param(
            ["binance:futures:BTCUSDT:1m", "2023-08-16", None],
            "SERIES: bad series_id",
            id="malformed-series",
        ),
        pytest.param(
            [BASE, "last tuesday", None], "--from: 'last tuesday' is not a time", id="garbage-time"
        ),
        pytest.param(
            [BASE, str(DAY * 1000), None],
            "--from: '1692144000000' looks like milliseconds",
            id="milliseconds",
        ),
    ],
)
def test_bad_arguments_are_refused_naming_the_argument(
    args: list[str | None], expected: str
) -> None:
    series, from_text, to_text = args
    assert series is not None and from_text is not None
    with pytest.raises(BadInputError) as refused:
        plan_backfill(series, from_text, to_text, DAY + 86400 * 2)
    assert str(refused.value).startswith(expected), str(refused.value)


def test_the_plan_ends_at_binance_current_minute() -> None:
    plan = BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 3600)
    assert plan.capped_at(DAY + 3600) is plan
    assert plan.capped_at(DAY + 7200) is plan
    capped = plan.capped_at(DAY + 1800)
    assert capped is not None and (capped.start, capped.end) == (DAY, DAY + 1800)
    assert plan.capped_at(DAY) is None  # the whole range is at or after Binance's clock


def bar(t: int) -> Candle:
    return Candle(t, Decimal(1), Decimal(1), Decimal(1), Decimal(1), Decimal(1))


def result(*updates: SeriesUpdate) -> PipelineResult:
    return PipelineResult(updates, (), sum(len(u.candles) for u in updates), 0)


def test_the_tally_counts_new_unchanged_revised_and_missing_minutes() -> None:
    tally = BackfillTally(BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 600))
    fetched = [bar(DAY + 60 * i) for i in range(10) if i not in (4, 5)]
    # of the 8 fetched, 5 were stored: 2 of them revised a different stored value
    tally.record(DAY, DAY + 600, fetched, result(SeriesUpdate(BASE, tuple(fetched[:5]), False, 2)))
    assert (tally.fetched, tally.new, tally.revised, tally.unchanged) == (8, 3, 2, 3)
    assert tally.stored == 5 and tally.complete
    assert (tally.missing, tally.missing_ranges) == (2, [(DAY + 240, DAY + 300)])
    assert tally.summary_lines()[0] == (
        "binance:futures:BTC/USDT:1m [2023-08-16T00:00Z, 2023-08-16T00:10Z): 10 minutes"
        " requested, 8 fetched, 3 new, 3 already stored (unchanged), 2 revised, 2 missing at"
        " the exchange"
    )
    assert "holes at the exchange (0 new gap events): 2023-08-16T00:04Z..2023-08-16T00:05Z (2)" in (
        tally.summary_lines()
    )


def test_a_derived_bar_split_across_two_pages_is_counted_once() -> None:
    tally = BackfillTally(BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 600))
    first = [bar(DAY + 60 * i) for i in range(7)]
    tally.record(
        DAY,
        DAY + 420,
        first,
        result(
            SeriesUpdate(BASE, tuple(first), False),
            SeriesUpdate(BASE_5M, (bar(DAY), bar(DAY + 300)), True),
        ),
    )
    rest = [bar(DAY + 60 * i) for i in range(7, 10)]
    tally.record(
        DAY + 420,
        DAY + 600,
        rest,
        result(
            SeriesUpdate(BASE, tuple(rest), False), SeriesUpdate(BASE_5M, (bar(DAY + 300),), True)
        ),
    )
    assert tally.derived == {BASE_5M: 2}
    assert f"{BASE_5M}: 2 derived bars written" in tally.summary_lines()


def test_many_missing_ranges_are_summarised() -> None:
    tally = BackfillTally(BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 3600))
    every_other = [bar(DAY + 120 * i) for i in range(30)]
    tally.record(DAY, DAY + 3600, every_other, None)
    assert len(tally.missing_ranges) == 30
    lines = tally.summary_lines()
    assert lines[1].startswith("holes at the exchange (0 new gap events): 2023-08-16T00:01Z, ")
    assert lines[1].endswith(" and 19 more ranges")  # 29 holes: the first 10 are shown
    assert lines[2] == "missing after the last candle (a gap once a candle above is stored):" + (
        " 2023-08-16T00:59Z"
    )
    assert lines[-1].startswith("nothing changed: the store already held")


def test_missing_minutes_are_told_apart_before_inside_and_after_the_history() -> None:
    plan = BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 600)
    present = [bar(DAY + 60 * i) for i in (2, 3, 6)]
    tally = BackfillTally(plan)
    tally.record(DAY, DAY + 600, present, None)
    assert tally.holes() == {
        "before": [(DAY, DAY + 60)],
        "holes": [(DAY + 240, DAY + 300)],
        "after": [(DAY + 420, DAY + 540)],
    }
    # with a candle stored below the range, the leading minutes are a hole too
    below = BackfillTally(plan, candle_below=True)
    below.record(DAY, DAY + 600, present, None)
    assert below.holes()["holes"] == [(DAY, DAY + 60), (DAY + 240, DAY + 300)]
    # no candle at all: nothing yet (before), or everything after the stored history
    empty = BackfillTally(plan)
    empty.record(DAY, DAY + 600, [], None)
    assert empty.holes()["before"] == [(DAY, DAY + 540)]
    after = BackfillTally(plan, candle_below=True)
    after.record(DAY, DAY + 600, [], None)
    assert after.holes()["after"] == [(DAY, DAY + 540)]


def test_a_page_stored_whole_is_skipped_and_counted_unchanged() -> None:
    tally = BackfillTally(BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 1200))
    tally.skip(DAY, DAY + 600)
    fetched = [bar(DAY + 600 + 60 * i) for i in range(10)]
    tally.record(DAY + 600, DAY + 1200, fetched, result(SeriesUpdate(BASE, tuple(fetched), False)))
    assert (tally.fetched, tally.new, tally.unchanged) == (10, 10, 10)
    assert (tally.pages_skipped, tally.pages_fetched, tally.minutes_skipped) == (1, 1, 10)
    tally.elapsed_s = 1.25
    lines = tally.summary_lines()
    assert lines[0].endswith(
        "20 minutes requested, 10 fetched, 10 new, 10 already stored (unchanged), 0 revised,"
        " 0 missing at the exchange"
    )
    assert lines[1:] == [
        "resumed: 10 minutes in 1 pages were stored already and not fetched again",
        "took 1.2 s, 1 REST pages",
    ]


def test_holes_are_the_missing_minutes_inside_the_series_history() -> None:
    """A run is recorded with the first candle above it, and only with one below it too."""
    m = 60
    finder = HoleFinder(candle_below=False)
    # before the symbol's first bar (nothing below): not a hole; 3..4 is one
    assert finder.page(0, 10 * m, [2 * m, 5 * m, 6 * m, 7 * m]) == ((3 * m, 5 * m),)
    # 8..9 at the page's end waits for the next page; a page with nothing adds to it; the
    # run across the three pages is one hole
    assert finder.page(10 * m, 20 * m, []) == ()
    assert finder.trailing() == ((8 * m, 20 * m),)
    assert finder.page(20 * m, 30 * m, [22 * m, 29 * m]) == ((8 * m, 22 * m), (23 * m, 29 * m))
    # after the last bar of the range: nothing above, not recorded, but trailing
    assert finder.page(30 * m, 40 * m, []) == ()
    assert finder.trailing() == ((30 * m, 40 * m),)
    # with a candle stored below the range, the leading run is a hole too
    assert HoleFinder(candle_below=True).page(0, 5 * m, [3 * m]) == ((0, 3 * m),)
    assert HoleFinder(candle_below=True).page(0, 3 * m, [0, m, 2 * m]) == ()
    assert HoleFinder(candle_below=False).page(0, 5 * m, []) == ()
    assert HoleFinder(candle_below=False).trailing() == ()


def test_a_hole_whose_candle_above_was_stored_before_is_not_recorded_again() -> None:
    m = 60
    runs = ((0, 2 * m), (3 * m, 5 * m))
    present = [2 * m, 5 * m, 6 * m]
    assert unrecorded(runs, present, set()) == runs
    assert unrecorded(runs, present, {2 * m}) == ((3 * m, 5 * m),)
    assert unrecorded(runs, present, {2 * m, 5 * m, 6 * m}) == ()
