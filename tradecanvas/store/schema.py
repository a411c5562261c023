"""The SQLite schema and its forward migrations (``PRAGMA user_version`` counts them)."""

from __future__ import annotations

import sqlite3
from typing import Final

from tradecanvas.errors import StoreError

_MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the candle table and a key/value table for settings such as the fingerprint
    """
    CREATE TABLE candles (
        series_id TEXT NOT NULL,
        candle_time INTEGER NOT NULL,
        open TEXT NOT NULL,
        high TEXT NOT NULL,
        low TEXT NOT NULL,
        close TEXT NOT NULL,
        volume TEXT NOT NULL,
        quote_volume TEXT,
        trades INTEGER,
        taker_buy_base TEXT,
        taker_buy_quote TEXT,
        source TEXT NOT NULL CHECK (source IN ('ws', 'rest', 'http', 'derived')),
        complete INTEGER NOT NULL DEFAULT 1 CHECK (complete IN (0, 1)),
        PRIMARY KEY (series_id, candle_time)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    """,
    # 2: the event log (DESIGN §10): one strictly increasing event_id for the whole store;
    # AUTOINCREMENT never reuses an id, even after the newest events are pruned
    """
    CREATE TABLE events (
        event_id INTEGER PRIMARY KEY AUTOINCREMENT,
        series_id TEXT NOT NULL,
        event TEXT NOT NULL,
        data TEXT NOT NULL,
        created_at REAL NOT NULL
    );
    CREATE INDEX events_by_series ON events (series_id, event_id);
    """,
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the forward migrations above ``PRAGMA user_version``; return the new version."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"candle store schema version {version} is newer than this tradecanvas"
            f" ({SCHEMA_VERSION}); upgrade tradecanvas"
        )
    for number in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION
