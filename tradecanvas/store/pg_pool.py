"""The PostgreSQL store's connection pool settings (``store/postgres.py``): what each
connection is opened with, how the pool checks a connection it hands out, which of
psycopg's and psycopg_pool's log records the store's own lines make redundant, how the store
logs an outage, and how the store tells a lost connection from a failed statement.
"""

from __future__ import annotations

import logging
import select
import time
from typing import Final

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool, PoolTimeout

from tradecanvas.errors import store_errors_from
from tradecanvas.store.pg_txn import Conn

_LOST_STATES: Final = ("57P01", "57P02", "57P03")  # admin shutdown, crash, starting up

# per connection: a backend whose client vanished gives the write lock back
CONNECTION_OPTIONS: Final = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
    "options": "-c idle_in_transaction_session_timeout=60000",
}


def check_idle_connection(conn: Conn) -> None:
    """The pool's check of a connection it hands out, without a round trip in the common case.

    A server says nothing to an idle connection unless it is ending it: a terminated
    backend (a restart, ``pg_terminate_backend``) sends its FATAL notice and closes the
    socket, so the socket turns readable. Only then is the connection asked (psycopg_pool's
    ``check_connection``, an empty query), and it fails if it is gone. A readable socket
    for another reason (a parameter status, a notice) costs that one round trip. Asking
    every time, as ``check_connection`` alone does, was one more round trip per
    transaction and per read. A connection whose peer vanished without a word (a network
    cut) passes both checks; the statement then fails and the write is tried again
    (``store/postgres.py``), as before.
    """
    if conn.closed or conn.broken:
        raise psycopg.OperationalError("the connection is closed")
    # poll, not select: a daemon with thousands of subscribers has descriptors above
    # select's FD_SETSIZE (1024), where select.select raises ValueError
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    if poller.poll(0):
        ConnectionPool.check_connection(conn)


# psycopg_pool's WARNINGs that only repeat an outage the store reports itself
_POOL_OUTAGE_MESSAGES: Final = (
    "error connecting in",
    "discarding closed connection",
    "reconnection attempt in pool",
)
# psycopg_pool's background reconnection doubles its wait after each failed attempt (1, 2, 4,
# … s) until it gives up after this long; the next write starts a new one at 1 s. Left at its
# default (300 s) the waits grew to 32 and 64 s, so after a long outage the store stayed
# away up to a minute after the server answered again (seen: 2–53 s); now up to ~4 s.
RECONNECT_WINDOW_S: Final = 8.0


class _QuietReconnects(logging.Filter):
    """While the server is away psycopg_pool logs a WARNING for each failed attempt of its
    background reconnection (multi-line libpq messages, one every few seconds for the
    whole outage), for each broken connection given back to it, and each time one
    reconnection gives up (every RECONNECT_WINDOW_S). The store already logs
    the outage once (``unreachable``), each write it tries again, and the end (``answers
    again``). Those records are lowered to DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and str(record.msg).startswith(_POOL_OUTAGE_MESSAGES):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


_POOL_LOG: Final = logging.getLogger("psycopg.pool")
_POOL_LOG.addFilter(_QuietReconnects())


class _QuietBrokenPipelines(logging.Filter):
    """A write whose connection breaks leaves psycopg's pipeline and transaction blocks
    unable to end cleanly: on the way out of each (three nested in a write transaction)
    psycopg logs a WARNING ``error ignored terminating <psycopg.Pipeline [BAD] …>: the
    connection is lost`` (or ``error ignored in rollback of …``, ``error ignored exiting
    …``) and re-raises the first error, which the store handles (the write is tried again,
    or its COMMIT looked up) and reports itself. Those records, when the error ignored is
    a lost connection, are lowered to DEBUG; any other stays a WARNING."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.levelno == logging.WARNING
            and str(record.msg).startswith("error ignored")
            and isinstance(record.args, tuple)
            and record.args
            and isinstance(record.args[-1], BaseException)
            and connection_lost(record.args[-1])
        ):
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)
        return True


logging.getLogger("psycopg").addFilter(_QuietBrokenPipelines())

# an outage of the store that lasts this long is logged again at ERROR (its start is a
# WARNING: a server restart the store rides out takes a few seconds)
OUTAGE_ERROR_AFTER_S: Final = 30.0


class OutageLog:
    """The store's lines about reaching its server: WARNING ``… unreachable: <why>`` when a
    statement or a ping first fails to reach it, ERROR ``… still unreachable after N s`` at
    the first failure :data:`OUTAGE_ERROR_AFTER_S` after that (a real outage is not hidden),
    WARNING ``… answers again after N s`` when one reaches it again."""

    def __init__(self, where: str, log: logging.Logger) -> None:
        self._where = where
        self._log = log
        self._since: float | None = None  # when the outage began (None: reachable)
        self._escalated = False

    def note(self, reachable: bool, error: str | None) -> None:
        now = time.monotonic()
        if reachable:
            if self._since is not None:
                self._log.warning(
                    "candle store: %s answers again after %.1f s", self._where, now - self._since
                )
            self._since, self._escalated = None, False
        elif self._since is None:
            self._since = now
            self._log.warning(
                "candle store: %s unreachable: %s; retrying (an ERROR if it lasts %.0f s)",
                self._where,
                error,
                OUTAGE_ERROR_AFTER_S,
            )
        elif not self._escalated and now - self._since >= OUTAGE_ERROR_AFTER_S:
            self._escalated = True
            self._log.error(
                "candle store: %s still unreachable after %.0f s: %s",
                self._where,
                now - self._since,
                error,
            )


def translated(what: str) -> store_errors_from:
    """Translate psycopg errors into StoreError at the store's edge."""
    return store_errors_from(psycopg.Error, what, connection_lost)


def connection_lost(exc: BaseException) -> bool:
    """A failure of the connection, not of the statement: worth trying again."""
    if isinstance(exc, PoolTimeout):
        return True
    if not isinstance(exc, psycopg.OperationalError):
        return False
    state = exc.sqlstate
    return state is None or state.startswith("08") or state in _LOST_STATES


def first_line(exc: BaseException) -> str:
    if isinstance(exc, PoolTimeout):
        # psycopg_pool's "couldn't get a connection after 2.00 sec": its reconnection to
        # the server has not succeeded yet
        return f"PoolTimeout: {exc} (the pool's reconnection has not got through yet)"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def describe_url(url: str) -> str:
    """``postgresql://user@host:port/dbname`` without the password, for messages."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://<unparsable URL>"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"
