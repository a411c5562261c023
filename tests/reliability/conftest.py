"""Prints every reliability line at the end of the run (``record.REPORTED``); the bus
tests' fixtures for the distributed topology: a PostgreSQL database and a Redis key prefix
of each test's own, and private ``redis-server``s."""

from __future__ import annotations

import pytest

from tests.bus.conftest import keys as keys
from tests.bus.conftest import pg_url as pg_url
from tests.bus.conftest import private_redis as private_redis
from tests.bus.conftest import pytest_configure as pytest_configure
from tests.bus.conftest import redis_url as redis_url
from tests.reliability.record import REPORTED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORTED:
        terminalreporter.section("reliability")
        for line in REPORTED:
            terminalreporter.write_line(line)
