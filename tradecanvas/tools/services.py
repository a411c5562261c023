"""The PostgreSQL and Redis servers of a test, benchmark or acceptance run (issue 15's rule:
each run makes a database of its own, dropped afterwards, and answers "is the service
there?" before it starts). Shared by ``bench/scaleout.py``, ``scripts/e2e_services.py`` and
the PostgreSQL tests; the URLs are the caller's (they read ``TEST_POSTGRES_URL`` and
``TEST_REDIS_URL``). A message names a URL without its password (``url_without_password``).

Blocking calls (psycopg's synchronous API, a socket): call them outside trio, or through
``trio.to_thread.run_sync``.
"""

from __future__ import annotations

import contextlib
import socket
import uuid
from collections.abc import Iterator
from typing import Final
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from tradecanvas.service_urls import url_without_password

# how long a service may take to answer the first question
ANSWER_TIMEOUT_S: Final = 5


def postgres_missing(admin_url: str) -> str | None:
    """Why the PostgreSQL server at ``admin_url`` cannot be used (None: it answers)."""
    try:
        with psycopg.connect(admin_url, connect_timeout=ANSWER_TIMEOUT_S) as conn:
            conn.execute("SELECT 1")
    except psycopg.OperationalError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"PostgreSQL at {url_without_password(admin_url)} does not answer: {first}"
    return None


def redis_missing(redis_url: str) -> str | None:
    """Why the Redis at ``redis_url`` (``redis://host:port/db``) cannot be used (None: it
    answers PING)."""
    where, shown = urlsplit(redis_url), url_without_password(redis_url)
    try:
        with socket.create_connection(
            (where.hostname or "127.0.0.1", where.port or 6379), timeout=ANSWER_TIMEOUT_S
        ) as sock:
            sock.sendall(b"PING\r\n")
            if not sock.recv(16).startswith(b"+PONG"):
                return f"Redis at {shown} does not answer PING"
    except OSError as exc:
        return f"Redis at {shown} does not answer: {exc}"
    return None


def services_missing(admin_url: str, redis_url: str) -> str | None:
    """Why PostgreSQL or Redis cannot be used (None: both answer)."""
    return postgres_missing(admin_url) or redis_missing(redis_url)


def url_for(admin_url: str, dbname: str) -> str:
    """``admin_url`` with another database name."""
    parts = conninfo_to_dict(admin_url)
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '127.0.0.1')}{port}/{dbname}"


@contextlib.contextmanager
def fresh_database(admin_url: str, prefix: str) -> Iterator[tuple[str, str]]:
    """(name, url) of a new, empty database ``<prefix><random>`` on the server of
    ``admin_url`` (a role that may create databases); dropped afterwards, even with
    connections left."""
    name = f"{prefix}{uuid.uuid4().hex[:16]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield name, url_for(admin_url, name)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
