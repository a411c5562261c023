"""A Redis outage in the log: the first failure, a summary a minute, the reconnect with how
long it lasted — not a WARNING per retry (an 11 s outage made 26 lines on the lease holder;
review: soak2)."""

from __future__ import annotations

import logging

import pytest

from tradecanvas.bus.outage_log import SUMMARY_EVERY_S, OutageLog


def test_an_outage_is_its_first_line_a_summary_a_minute_and_its_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outage = OutageLog(logging.getLogger("t"))
    assert outage.recovered(0.0) == ""  # no outage: nothing to add
    with caplog.at_level(logging.DEBUG, logger="t"):
        for attempt in range(600):  # a retry every 0.25 s for 150 s
            outage.failed(100.0 + attempt * 0.25, "Redis failed (refused), retrying")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "Redis failed (refused), retrying",
        "Redis failed (refused), retrying (still failing: 241 attempts in 60 s)",
        "Redis failed (refused), retrying (still failing: 481 attempts in 120 s)",
    ]
    assert sum(r.levelno == logging.DEBUG for r in caplog.records) == 597
    during = outage.ongoing
    assert outage.recovered(100.0 + 152.0) == " after 152.0 s (600 failed attempts)"
    assert (during, outage.ongoing, outage.recovered(300.0)) == (True, False, "")
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="t"):
        outage.failed(400.0, "again")  # a new outage starts with a WARNING of its own
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert outage.recovered(401.5) == " after 1.5 s (1 failed attempt)"
    assert SUMMARY_EVERY_S == 60.0
