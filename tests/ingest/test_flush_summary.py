"""FlushSummary: when a committer's summary line is due and what it says (synchronous)."""

from __future__ import annotations

from tradecanvas.ingest.flush_summary import SUMMARY_S, FlushSummary

T0 = 1_000.0  # an arbitrary monotonic start


def flush(
    summary: FlushSummary,
    now: float,
    received: int = 100,
    *,
    duplicates: int = 0,
    events: int = 0,
    commit_ms: float = 4.0,
    publish_ms: float = 1.0,
) -> str | None:
    return summary.add(
        now,
        received=received,
        committed=received - duplicates,
        duplicates=duplicates,
        events=events,
        commit_s=commit_ms / 1e3,
        publish_s=publish_ms / 1e3,
    )


def test_nothing_is_due_within_a_minute_of_the_first_flush() -> None:
    summary = FlushSummary("BTC", "pipeline")
    for i in range(120):
        assert flush(summary, T0 + i * 0.499) is None  # the last at T0 + 59.4 s


def test_the_first_flush_a_minute_after_the_first_writes_the_summary() -> None:
    summary = FlushSummary("BTC", "pipeline")
    assert flush(summary, T0) is None
    assert flush(summary, T0 + 30) is None
    assert flush(summary, T0 + SUMMARY_S - 0.001) is None
    line = flush(summary, T0 + SUMMARY_S + 0.2)
    assert line is not None
    assert line.startswith("BTC: 4 flushes in the last 60 s: 400 received,")


def test_the_line_sums_the_counts_and_gives_the_median_and_max_of_the_times() -> None:
    summary = FlushSummary("conn-0", "legacy")
    # (now, received, duplicates, events, commit ms, publish ms)
    flushes = [
        (0.0, 9_000, 0, 0, 12.3, 1.2),
        (10.0, 400, 20, 1, 4.1, 5.0),
        (20.0, 14_000, 0, 2, 1.0, 0.4),
        (30.0, 1, 0, 0, 0.2, 1.3),
        (61.0, 0, 0, 0, 4.2, 0.1),
    ]
    lines = [
        flush(summary, T0 + t, n, duplicates=d, events=e, commit_ms=c, publish_ms=p)
        for t, n, d, e, c, p in flushes
    ]
    assert lines[:-1] == [None] * 4
    assert lines[-1] == (
        "conn-0: 5 flushes in the last 61 s: 23,401 received, 23,381 committed,"
        " 20 duplicates, 3 events;"
        " commit p50 4.1 ms max 12.3 ms, publish p50 1.2 ms max 5.0 ms (legacy)"
    )


def test_the_median_of_an_even_count_is_the_mean_of_the_middle_two() -> None:
    summary = FlushSummary("BTC", "pipeline")
    for t, ms in ((0, 10.0), (1, 2.0), (2, 3.0), (60, 1.0)):
        line = flush(summary, T0 + t, commit_ms=ms, publish_ms=ms * 2)
    assert line is not None
    assert line.endswith("commit p50 2.5 ms max 10.0 ms, publish p50 5.0 ms max 20.0 ms (pipeline)")


def test_after_a_summary_the_counts_start_over_and_the_next_is_a_minute_later() -> None:
    summary = FlushSummary("BTC", "pipeline")
    assert flush(summary, T0, 7, commit_ms=50.0) is None
    assert flush(summary, T0 + 60, 5, commit_ms=50.0) is not None  # the first summary
    assert flush(summary, T0 + 70, 3, duplicates=1, commit_ms=2.0) is None
    assert flush(summary, T0 + 119.9, 4, events=2, commit_ms=6.0) is None
    line = flush(summary, T0 + 120, 10, commit_ms=4.0)
    # only the three flushes after the first summary, none of its 50 ms commits
    assert line == (
        "BTC: 3 flushes in the last 60 s: 17 received, 16 committed, 1 duplicates, 2 events;"
        " commit p50 4.0 ms max 6.0 ms, publish p50 1.0 ms max 1.0 ms (pipeline)"
    )


def test_after_a_quiet_spell_the_first_flush_writes_a_summary_of_its_real_span() -> None:
    """No timer: a committer that had nothing to commit wrote nothing; the next flush
    closes the window and says how long it really was."""
    summary = FlushSummary("BTC", "pipeline")
    assert flush(summary, T0) is None
    assert flush(summary, T0 + 60) is not None
    line = flush(summary, T0 + 60 + 3_600, 2)
    assert line is not None
    assert line.startswith("BTC: 1 flush in the last 3600 s: 2 received, 2 committed,")
