"""Prints every reliability line at the end of the run (``record.REPORTED``)."""

from __future__ import annotations

import pytest

from tests.reliability.record import REPORTED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTED:
        terminalreporter.section("reliability")
        for line in REPORTED:
            terminalreporter.write_line(line)
