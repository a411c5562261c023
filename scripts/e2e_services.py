"""PostgreSQL and Redis for the distributed acceptance run (scripts/e2e_distributed.py):
whether they answer, a database of the run's own (dropped afterwards) and the deletion of the
run's bus keys. The servers are the tests' (``TEST_POSTGRES_URL``, ``TEST_REDIS_URL``)."""

from __future__ import annotations

import contextlib
import os
import socket
import uuid
from collections.abc import Iterator
from typing import Final
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tradecanvas.bus.redis_io import open_redis

ADMIN_URL: Final = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL: Final = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def services_missing() -> str | None:
    """Why PostgreSQL or Redis cannot be used (None: both answer)."""
    try:
        with psycopg.connect(ADMIN_URL, connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        return f"PostgreSQL at {ADMIN_URL} does not answer: {str(exc).strip().splitlines()[0]}"
    where = urlsplit(REDIS_URL)
    try:
        with socket.create_connection((where.hostname, where.port or 6379), timeout=5) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                return f"Redis at {REDIS_URL} does not answer PING"
    except OSError as exc:
        return f"Redis at {REDIS_URL} does not answer: {exc}"
    return None


def _url_for(dbname: str) -> str:
    """ADMIN_URL with another database name."""
    parts = conninfo_to_dict(ADMIN_URL)
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '127.0.0.1')}{port}/{dbname}"


@contextlib.contextmanager
def fresh_database() -> Iterator[tuple[str, str]]:
    """(name, url) of a new, empty database; dropped afterwards, even with connections left."""
    name = f"tc_e2e_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name, _url_for(name)
    finally:
        with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


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
