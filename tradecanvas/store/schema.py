"""The SQLite schema and its forward migrations (``PRAGMA user_version`` counts them)."""

from __future__ import annotations

import sqlite3
import time
from typing import Final

import attrs

from tradecanvas.errors import StoreTooNew

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


@attrs.frozen
class SchemaChange:
    """What opening a store did to its schema (either backend): ``before`` → ``after``
    (0: a new store), in ``seconds``; ``serve`` logs :meth:`line` once at start-up."""

    where: str
    before: int
    after: int
    seconds: float

    def line(self) -> str:
        if self.before == self.after:
            return f"candle store {self.where}: schema {self.after} (current)"
        did = "created" if self.before == 0 else "migrated"
        return (
            f"candle store {self.where}: schema {self.before} → {self.after}"
            f" ({did} in {self.seconds:.2f} s)"
        )


def too_new(where: str, found: int, writes: int) -> StoreTooNew:
    """The refusal of a store whose schema is newer than this release writes: a rollback
    that did not restore the backup taken before the upgrade (exit 4)."""
    return StoreTooNew(
        f"candle store {where} has schema {found}, newer than this tradecanvas writes"
        f" ({writes}): run the release that wrote it, or restore a backup taken before the"
        " upgrade"
    )


def migrate(conn: sqlite3.Connection, where: str = "") -> SchemaChange:
    """Apply the forward migrations above ``PRAGMA user_version``; say what changed.
    Raises StoreTooNew for a file newer than this code (``where`` names it)."""
    started = time.monotonic()
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise too_new(where or "file", version, SCHEMA_VERSION)
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
    return SchemaChange(where, version, SCHEMA_VERSION, time.monotonic() - started)
