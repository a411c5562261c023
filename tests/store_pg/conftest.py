"""Real PostgreSQL for the store tests: each test gets its own database (a unique name),
dropped afterwards. Outside CI a server that does not answer skips these tests with the
reason; with ``CI=true`` it is a failure (the issue's rule)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import attrs
import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import open_store

# the server the tests use (trust auth on loopback); TEST_POSTGRES_URL overrides it
ADMIN_URL: Final = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def _server_answers() -> str | None:
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        return str(exc).strip().splitlines()[0]
    return None


def _require_server() -> None:
    problem = _server_answers()
    if problem is None:
        return
    reason = f"PostgreSQL at {ADMIN_URL} does not answer: {problem}"
    if os.environ.get("CI") == "true":
        pytest.fail(reason + " (CI=true: a missing service is a failure)")
    pytest.skip(reason)


def _url_for(dbname: str) -> str:
    """ADMIN_URL with another database name."""
    parts = conninfo_to_dict(ADMIN_URL)
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '127.0.0.1')}{port}/{dbname}"


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh, empty database; dropped after the test (even one that left connections)."""
    _require_server()
    name = f"tc_test_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield _url_for(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


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
