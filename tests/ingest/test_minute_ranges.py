"""The minute-run arithmetic the tracker's start-up rechecks use (``missing_below``), and a
restart whose run called absent began below the recheck window (review: diffrev)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.ingest.minute_ranges import missing_below, runs
from tradecanvas.ingest.tracker import (
    RECHECK_AT_START_S,
    REST_LAG_MAX_MS,
    FillRequest,
    SeriesTracker,
)

T0 = 1_751_760_000  # 2025-07-06 00:00 UTC
HEAD = T0 + 3600


def test_a_run_that_began_below_the_window_is_rechecked_inside_it_after_a_restart() -> None:
    """A run called absent on exchange time alone (REST lagging), H-540 .. H-60, then a
    restart before its recheck: the stored minutes are H-720, H-660, H-600, H. Its part
    within the window is asked for once more when due."""
    stored = [HEAD - 60 * i for i in (12, 11, 10, 0)]
    tr = SeriesTracker(head=HEAD, initial_backfill=0, late_close_ms=10_000, stored=stored)
    tr.on_exchange_time(HEAD * 1000 + REST_LAG_MAX_MS)
    assert tr.next_fill(now=0.0) == FillRequest(HEAD - RECHECK_AT_START_S, HEAD, "recheck")


minute_sets = st.sets(st.integers(min_value=0, max_value=40), max_size=40)


@given(minute_sets, st.integers(min_value=0, max_value=40), st.integers(min_value=0, max_value=12))
def test_missing_below_is_every_unstored_minute_of_the_window_after_the_first_stored_one(
    stored_minutes: set[int], head_minute: int, window_minutes: int
) -> None:
    stored = [T0 + 60 * m for m in stored_minutes]
    head = T0 + 60 * head_minute
    found = missing_below(head, stored, 60 * window_minutes)
    minutes = [t for a, b in found for t in range(a, b, 60)]
    expected = [
        t
        for t in range(max(head - 60 * window_minutes, T0), head, 60)
        if t not in stored and any(s < t for s in stored) and any(t < s <= head for s in stored)
    ]
    assert minutes == expected
    assert runs(minutes) == found  # maximal runs, ascending


def test_no_head_no_runs() -> None:
    assert missing_below(None, [T0], 360) == ()
