"""``tradecanvas backfill``'s progress: the shared display counting minutes of the range."""

from __future__ import annotations

import io
import logging
import re

import pytest

from tradecanvas.model import SeriesId
from tradecanvas.tools.backfill import BackfillPlan, BackfillTally, Progress
from tradecanvas.tools.backfill.progress import PROGRESS_LOG_INTERVAL_S, ClearProgressFilter

BASE = "binance:futures:BTC/USDT:1m"
DAY = 1_692_144_000  # 2023-08-16
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def tally_of(minutes: int) -> BackfillTally:
    return BackfillTally(BackfillPlan(SeriesId.parse(BASE), DAY, DAY + 60 * minutes))


def test_on_a_terminal_the_bar_counts_minutes_and_is_left_at_the_end() -> None:
    stream = io.StringIO()
    progress = Progress(stream, tty=True)
    tally = tally_of(3100)
    for now, (start, end) in enumerate(tally.plan.chunks()):
        tally.record(start, end, [], None)
        progress.update(tally, float(now))
    progress.finish()
    text = ANSI.sub("", stream.getvalue())
    for shown in ("48% 1,500/3,100 min", "97% 3,000/3,100 min", "100% 3,100/3,100 min"):
        assert shown in text
    assert text.endswith("\n")


def test_a_log_line_is_printed_above_the_bar() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    progress = Progress(stream, tty=True)
    clear = ClearProgressFilter(progress)
    handler.addFilter(clear)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        record = logging.LogRecord("x", logging.WARNING, "", 0, "m", None, None)
        assert clear.filter(record)  # nothing drawn yet: the handler writes it
        tally = tally_of(10)
        tally.record(DAY, DAY + 60, [], None)
        progress.update(tally, 0.0)
        assert not clear.filter(record)
        assert "WARNING m\n" in ANSI.sub("", stream.getvalue())
        progress.finish()
    finally:
        root.removeHandler(handler)


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
        f"backfill {BASE}: 1/4 min (25%), ETA ?",
        f"backfill {BASE}: 3/4 min (75%), 1 min/s, ETA 0:02",
        f"backfill {BASE}: 4/4 min (100%), 1 min/s, ETA 0:00",
    ]
    assert stream.getvalue() == ""
