"""The PostgreSQL schema and its versioned forward migrations.

``schema_version`` holds one row per applied migration. :func:`migrate` applies the missing
ones at start-up, each in its own transaction together with its version row (PostgreSQL's
DDL is transactional: a migration is all in or all out), under a session advisory lock so
that two processes starting at once do not both apply it. A database whose schema is newer
than this code is refused with :class:`StoreTooNew` (exit 4) before anything is written.

Beside the versioned migrations, tables that a release which does not know them never reads
are made when missing, under the same lock, without a version of their own (an older
release runs on, or rolls back to, a database that has them): ``commit_tokens``
(``store/pg_commit_token.py``).

The tables mirror the SQLite store's (``store/schema.py``): prices and volumes are
``NUMERIC`` without a typmod, which keeps the scale received (``1.0`` stays ``1.0``) and
compares numerically (``1.0 = 1.00``); the event log's ids come from a one-row counter
updated in the writing transaction (see ``store/pg_txn.py``).
"""

from __future__ import annotations

import time
from typing import Final

import psycopg

from tradecanvas.store.pg_commit_token import ensure_table
from tradecanvas.store.schema import SchemaChange, too_new

# pg_advisory_lock keys (one 64-bit namespace per database): arbitrary, fixed constants
MIGRATION_LOCK_KEY: Final = 0x7472_6164_6563_0001  # "tradec" + 1
WRITE_LOCK_KEY: Final = 0x7472_6164_6563_0002

MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: candles, meta, the event log (DESIGN §10) and its id counter
    """
    CREATE TABLE candles (
        series_id TEXT NOT NULL,
        candle_time BIGINT NOT NULL,
        open NUMERIC NOT NULL,
        high NUMERIC NOT NULL,
        low NUMERIC NOT NULL,
        close NUMERIC NOT NULL,
        volume NUMERIC NOT NULL,
        quote_volume NUMERIC,
        trades BIGINT,
        taker_buy_base NUMERIC,
        taker_buy_quote NUMERIC,
        source TEXT NOT NULL CHECK (source IN ('ws', 'rest', 'http', 'derived')),
        complete BOOLEAN NOT NULL DEFAULT TRUE,
        PRIMARY KEY (series_id, candle_time)
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE events (
        event_id BIGINT PRIMARY KEY,
        series_id TEXT NOT NULL,
        event TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at DOUBLE PRECISION NOT NULL
    );
    CREATE INDEX events_by_series ON events (series_id, event_id);
    CREATE TABLE event_counter (
        only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
        last_id BIGINT NOT NULL
    );
    INSERT INTO event_counter (only_row, last_id) VALUES (TRUE, 0);
    """,
    # 2: write transactions so far (StoreTxn.sequence: the pipeline's recent-bars cache
    # holds only while nobody else wrote between two of its transactions)
    """
    CREATE TABLE write_counter (
        only_row BOOLEAN PRIMARY KEY DEFAULT TRUE CHECK (only_row),
        last_sequence BIGINT NOT NULL
    );
    INSERT INTO write_counter (only_row, last_sequence) VALUES (TRUE, 0);
    """,
)
SCHEMA_VERSION: Final = len(MIGRATIONS)

_VERSION_TABLE: Final = """
    CREATE TABLE IF NOT EXISTS schema_version (
        version INTEGER PRIMARY KEY,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
"""


def current_version(conn: psycopg.Connection[tuple[object, ...]]) -> int:
    """The highest applied migration (0 for an empty database)."""
    row = conn.execute("SELECT to_regclass('schema_version') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    return 0 if row is None else int(str(row[0]))


def migrate(
    conn: psycopg.Connection[tuple[object, ...]], where: str, *, writes: bool = True
) -> SchemaChange:
    """Apply the migrations above the database's version; say what changed. ``writes``:
    also make the table of commit tokens when missing (a reader never needs it, and its
    login may not be allowed to make it).

    ``conn`` must be in autocommit mode (each migration opens its own transaction).
    Raises StoreTooNew when the database is newer than this code; psycopg errors propagate
    (the store translates them).
    """
    started = time.monotonic()
    conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
    try:
        version = current_version(conn)
        if version > SCHEMA_VERSION:
            raise too_new(where, version, SCHEMA_VERSION)
        for number in range(version, SCHEMA_VERSION):
            with conn.transaction():
                conn.execute(_VERSION_TABLE)
                conn.execute(MIGRATIONS[number])
                conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (number + 1,))
        if writes:
            with conn.transaction():
                ensure_table(conn, where)
        return SchemaChange(where, version, SCHEMA_VERSION, time.monotonic() - started)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (MIGRATION_LOCK_KEY,))
