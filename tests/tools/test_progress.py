"""The shared progress display (``tradecanvas.tools.progress``), writing to a StringIO."""

from __future__ import annotations

import io
import logging
import re

import pytest

from tradecanvas.tools.progress import PROGRESS_LOG_INTERVAL_S, LogAboveBars, Progress, format_eta

SID = "binance:spot:BTC/USDT:1m"
OTHER = "binance:spot:ETH/USDT:1m"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
log = logging.getLogger("tests.progress")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def plain(text: str) -> str:
    return ANSI.sub("", text)


def test_eta_format() -> None:
    assert format_eta(None) == "?"
    assert format_eta(65.4) == "1:05"
    assert format_eta(3723) == "1:02:03"
    assert format_eta(-3) == "0:00"


def test_not_on_a_terminal_one_line_per_series_per_interval_and_one_at_the_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    stream = io.StringIO()
    progress = Progress(stream, log=log, verb="import", tty=False, clock=clock)
    caplog.set_level(logging.INFO, logger=log.name)
    progress.start(SID, 4000)
    progress.start(OTHER, None)
    for now, done in ((1.0, 1000), (2.0, 2000), (PROGRESS_LOG_INTERVAL_S + 1, 3000), (8.0, 4000)):
        clock.now = now
        progress.update(SID, done)
        progress.update(OTHER, done // 2)
    progress.update(SID, 4000)  # done already said: no second line
    progress.finish()
    assert [r.getMessage() for r in caplog.records] == [
        f"import {SID}: 1000/4000 candles (25%), 1000 candles/s, ETA 0:03",
        f"import {OTHER}: 500 candles, 500 candles/s",
        f"import {SID}: 3000/4000 candles (75%), 500 candles/s, ETA 0:02",
        f"import {OTHER}: 1500 candles, 250 candles/s",
        f"import {SID}: 4000/4000 candles (100%), 500 candles/s, ETA 0:00",
    ]
    assert stream.getvalue() == ""  # the lines go through logging


def test_on_a_terminal_a_bar_per_series_with_rate_and_eta() -> None:
    clock = Clock()
    stream = io.StringIO()
    progress = Progress(stream, log=log, verb="import", tty=True, clock=clock)
    progress.start(SID, 4320)
    progress.start(OTHER, 1440)
    for step in range(1, 4):
        clock.now = float(step)
        progress.update(SID, 1440 * step)
    progress.update(OTHER, 1440)
    progress.finish()
    progress.finish()  # again: nothing more
    text = plain(stream.getvalue())
    assert "1,440/4,320 candles" in text
    final = [line for line in text.replace("\r", "\n").splitlines() if line.strip()][-2:]
    assert re.fullmatch(rf"{re.escape(SID)} ━+ 100% 4,320/4,320 candles 1,440/s 0:00:00", final[0])
    assert final[1].startswith(f"{OTHER} ") and "100% 1,440/1,440 candles" in final[1]
    assert "0:00:01" in text  # the time left while it ran


def test_log_records_are_printed_above_the_bars() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    progress = Progress(stream, log=log, verb="import", tty=True, clock=Clock())
    above = LogAboveBars(progress, handler)
    record = logging.LogRecord("x", logging.WARNING, "", 0, "careful", None, None)
    assert above.filter(record)  # no bars yet: the handler writes it
    progress.start(SID, 10)
    assert not above.filter(record)  # printed by the display instead
    progress.finish()
    assert "\x1b[2KWARNING careful\n" in stream.getvalue()
    assert above.filter(record)


def test_capture_logs_routes_the_root_handlers_while_inside() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        progress = Progress(stream, log=log, verb="import", tty=True, clock=Clock())
        with progress.capture_logs():
            assert any(isinstance(f, LogAboveBars) for f in handler.filters)
        assert not handler.filters
    finally:
        root.removeHandler(handler)
