"""Real PostgreSQL for the store tests: each test gets its own database (a unique name),
dropped afterwards. Outside CI a server that does not answer skips these tests with the
reason; with ``CI=true`` it is a failure (the issue's rule)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs
import pytest

from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import open_store
from tradecanvas.tools.services import fresh_database, postgres_missing

# the server the tests use (trust auth on loopback); TEST_POSTGRES_URL overrides it
ADMIN_URL: Final = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _require_server() -> None:
    reason = postgres_missing(ADMIN_URL)
    if reason is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: a missing service is a failure)")
    pytest.skip(reason)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database; dropped after the test (even one that left connections)."""
    _require_server()
    with fresh_database(ADMIN_URL, "tc_test_") as (_, url):
        yield url


@attrs.frozen
class Backend:
    """Where a test's store lives: a SQLite file or a PostgreSQL database."""

    name: str
    location: str | Path

    async def open(self) -> MarketStore:
        return await open_store(self.location)


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    """Each test using it runs once per backend, with the same cases and expectations."""
    if request.param == "sqlite":
        yield Backend("sqlite", tmp_path / "m.sqlite3")
    else:
        yield Backend("postgresql", request.getfixturevalue("pg_url"))
