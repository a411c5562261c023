"""Did a PostgreSQL write transaction whose COMMIT lost its answer commit? (``store/postgres.py``)

A write whose connection broke while its COMMIT was on its way may or may not have
committed. Its transaction id cannot tell: after a crash (an immediate stop, a power cut) a
transaction whose COMMIT record never reached the WAL is gone, and since an id is not
WAL-logged until its transaction writes a record that is flushed, the recovered server can
hand the *same* id to another transaction — another ingest node, an import, a
``migrate-store``, this store's own retry — and ``pg_xact_status`` then answers for that one:
"committed" would make a lost write pass for one that went in (candles and events lost,
exactly-once broken).

So each write transaction records a token of its own instead, in the same transaction: one
row per writer in ``commit_tokens`` — the writer is a :class:`PostgresStore` instance (a
random id with the host and pid for the operator's eyes), the token the number of its
transaction, counted by the instance — updated in place (``INSERT … ON CONFLICT DO
UPDATE``). The statement is sent with the transaction's start in its pipeline and its answer
is never waited for: it costs no round trip. After an ambiguous COMMIT the store asks, once
the server answers, for its row *under the store's write lock*: the lost transaction held
that lock, so taking it waits until that transaction is over (committed, rolled back, or its
backend gone), and the row then holds that transaction's token if and only if it committed.
Only this instance writes its row, and it makes no other write until the question is
answered (it holds its write limiter), so no later token can hide the answer.

The table grows by one row per store instance that wrote; rows not written for
:data:`KEEP_DAYS` days (writers long gone: stopped, restarted, crashed) are deleted by a
writer's first transaction and every :data:`PRUNE_EVERY`-th after it, in the same pipeline
(no round trip). A writer idle that long makes its row again with its next write.

The table is made at start-up, under the migration lock, when it is missing (``migrate`` in
``store/pg_schema.py``): it needs no schema version, since a release that does not know it
never reads it (an older release can still run on, or roll back to, the same database).
"""

from __future__ import annotations

import itertools
import os
import socket
import uuid
from typing import TYPE_CHECKING, Final

import psycopg

from tradecanvas.errors import StoreError

if TYPE_CHECKING:
    from tradecanvas.store.pg_txn import Conn

# rows of writers that wrote nothing for this long are deleted: far longer than any outage
# during which a writer could still be waiting to ask about its last COMMIT
KEEP_DAYS: Final = 7
PRUNE_EVERY: Final = 10_000  # a writer's transactions between two prunings
# the wait for the store's write lock when asking (a lost transaction's backend that did not
# get its COMMIT holds it until the server notices; asked again after a backoff)
ASK_LOCK_TIMEOUT_MS: Final = 2_000

CREATE: Final = """
    CREATE TABLE commit_tokens (
        writer TEXT PRIMARY KEY,
        token BIGINT NOT NULL,
        written_at TIMESTAMPTZ NOT NULL
    )
"""
_RECORD: Final = (
    "INSERT INTO commit_tokens (writer, token, written_at) VALUES (%s, %s, now())"
    " ON CONFLICT (writer) DO UPDATE SET token = excluded.token, written_at = excluded.written_at"
)
_PRUNE: Final = "DELETE FROM commit_tokens WHERE written_at < now() - make_interval(days => %s)"
_ASK: Final = "SELECT token FROM commit_tokens WHERE writer = %s"


def ensure_table(conn: psycopg.Connection[tuple[object, ...]], where: str) -> bool:
    """Make ``commit_tokens`` unless it is there (in the caller's transaction); True: made.
    Raises StoreError, saying what to do, when this login may not make it (a writer needs
    it; a reader never asks: ``migrate``)."""
    row = conn.execute("SELECT to_regclass('commit_tokens') IS NOT NULL").fetchone()
    if row is not None and row[0]:
        return False
    try:
        conn.execute(CREATE)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise StoreError(
            f"candle store {where}: this release records each write's commit token in a table"
            f" commit_tokens, which is missing, and this login may not create it ({exc}):"
            " start the daemon once with a login that may create tables in the store's"
            " schema (its owner), or grant it CREATE on that schema"
        ) from exc
    return True


def new_writer_id() -> str:
    """Unique per call (a random UUID); the host and pid say whose row it is."""
    return f"{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex}"


class CommitTokens:
    """One writer's tokens: :meth:`record` in each write transaction, :meth:`committed`
    after an ambiguous COMMIT."""

    def __init__(self, writer: str | None = None) -> None:
        self.writer = new_writer_id() if writer is None else writer
        self._numbers = itertools.count(1)

    def record(self, conn: Conn) -> int:
        """Send this transaction's token (``conn`` in a transaction, pipeline mode: nothing
        is waited for); return it."""
        token = next(self._numbers)
        conn.execute(_RECORD, (self.writer, token))
        if token % PRUNE_EVERY == 1:
            conn.execute(_PRUNE, (KEEP_DAYS,))
        return token

    def committed(self, conn: Conn, token: int, lock_key: int) -> bool | None:
        """Did the transaction that recorded ``token`` commit? Asked under the store's write
        lock (``lock_key``; ``conn`` in autocommit mode): None when that lock is still held
        after :data:`ASK_LOCK_TIMEOUT_MS` (ask again). Raises psycopg errors."""
        try:
            with conn.transaction():
                conn.execute(f"SET LOCAL lock_timeout = {ASK_LOCK_TIMEOUT_MS}")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key,))
                row = conn.execute(_ASK, (self.writer,)).fetchone()
        except psycopg.errors.LockNotAvailable:
            return None
        if row is None:  # this writer never committed (or wrote nothing for KEEP_DAYS)
            return False
        stored = int(str(row[0]))
        assert stored <= token, (stored, token)  # no later transaction of ours ran
        return stored == token
