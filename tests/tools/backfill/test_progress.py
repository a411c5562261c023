"""``tradecanvas backfill``'s progress display, writing to a StringIO."""

from __future__ import annotations

import io
import logging

import pytest

from tradecanvas.model import SeriesId
from tradecanvas.tools.backfill import BackfillPlan, BackfillTally, Progress, render_bar
from tradecanvas.tools.backfill.progress import PROGRESS_LOG_INTERVAL_S, ClearProgressFilter

BASE = "binance:futures:BTC/USDT:1m"
DAY = 1_692_144_000  # 2023-08-16


def test_progress_bar_line() -> None:
    assert render_bar(BASE, 4320, 9600, 3950) == (
        "binance:futures:BTC/USDT:1m  [#########-----------]   45%  4320/9600 min  3,950 stored"
    )
    assert render_bar(BASE, 9600, 9600, 0).count("#") == 20


def tally_of(minutes: int) -> BackfillTally:
    return BackfillTally(BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 60 * minutes))


def test_on_a_terminal_the_bar_is_one_line_rewritten_and_left_at_the_end() -> None:
    stream = io.StringIO()
    progress = Progress(stream, tty=True)
    tally = tally_of(3100)
    for start, end in tally.plan.chunks():
        tally.record(start, end, [], None)
        progress.update(tally, 0.0)
    progress.finish()
    assert stream.getvalue() == (
        f"\r{render_bar(BASE, 1500, 3100, 0)}\x1b[K"
        f"\r{render_bar(BASE, 3000, 3100, 0)}\x1b[K"
        f"\r{render_bar(BASE, 3100, 3100, 0)}\x1b[K\n"
    )


def test_a_log_line_takes_the_bar_off_the_line_first() -> None:
    stream = io.StringIO()
    progress = Progress(stream, tty=True)
    tally = tally_of(10)
    tally.record(DAY, DAY + 60, [], None)
    progress.update(tally, 0.0)
    record = logging.LogRecord("x", logging.WARNING, "", 0, "m", None, None)
    assert ClearProgressFilter(progress).filter(record)
    assert stream.getvalue().endswith("\x1b[K\r\x1b[K")
    progress.finish()  # nothing drawn any more: no newline
    assert not stream.getvalue().endswith("\n")


def test_elsewhere_a_log_line_at_most_every_interval_and_one_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream = io.StringIO()
    progress = Progress(stream, tty=False)
    tally = tally_of(4)
    caplog.set_level(logging.INFO, logger="tradecanvas.tools.backfill")
    for i, now in enumerate((0.0, 1.0, PROGRESS_LOG_INTERVAL_S, PROGRESS_LOG_INTERVAL_S + 0.5)):
        tally.record(DAY + 60 * i, DAY + 60 * (i + 1), [], None)
        progress.update(tally, now)
    assert [r.getMessage() for r in caplog.records] == [
        f"backfill {BASE}: 1/4 min (25%), 0 stored",
        f"backfill {BASE}: 3/4 min (75%), 0 stored",
        f"backfill {BASE}: 4/4 min (100%), 0 stored",
    ]
    assert stream.getvalue() == ""
