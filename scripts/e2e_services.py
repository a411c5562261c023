"""PostgreSQL and Redis for the distributed acceptance run (scripts/e2e_distributed.py):
whether they answer, a database of the run's own (dropped afterwards) and the deletion of the
run's bus keys. The servers are the tests' (``TEST_POSTGRES_URL``, ``TEST_REDIS_URL``); the
work is ``tradecanvas.tools.services``'s, which the scale-out benchmark shares."""

from __future__ import annotations

import contextlib
import os
from typing import Final

import psycopg

from tradecanvas.bus.redis_io import open_redis
from tradecanvas.tools import services

ADMIN_URL: Final = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL: Final = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def services_missing() -> str | None:
    """Why PostgreSQL or Redis cannot be used (None: both answer)."""
    return services.services_missing(ADMIN_URL, REDIS_URL)


def fresh_database() -> contextlib.AbstractContextManager[tuple[str, str]]:
    """(name, url) of a new, empty database; dropped afterwards, even with connections left."""
    return services.fresh_database(ADMIN_URL, "tc_e2e_")


def database_exists(name: str) -> bool:
    with psycopg.connect(ADMIN_URL) as admin:
        row = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    return row is not None


async def delete_bus_keys(prefix: str) -> int:
    """Delete every key under the prefix; returns how many are left (0)."""
    async with open_redis(REDIS_URL) as client:
        found = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if found:
            await client.delete(found)
        return len([key async for key in client.scan_iter(match=f"{prefix}:*")])
