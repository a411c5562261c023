"""The SQLite store's single-writer lock (``store/writer_lock.py``), what opening a store
did to its schema (the line ``serve`` logs), and the refusal of a store newer than this
release (StoreTooNew, exit 4). Real SQLite files."""

from __future__ import annotations

import fcntl
import os
import sqlite3
from pathlib import Path

import pytest

from tradecanvas.errors import ExitCode, StoreInUse, StoreTooNew, start_failure
from tradecanvas.store.open import open_served_store, shares_writer_lock, takes_writer_lock
from tradecanvas.store.schema import _MIGRATIONS, SCHEMA_VERSION
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.writer_lock import lock_path


def schema_1_store(path: Path) -> None:
    """A store as the release before the event log wrote it (schema 1)."""
    conn = sqlite3.connect(path)
    conn.executescript(_MIGRATIONS[0])
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


def user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        conn.close()


async def test_a_second_locked_open_is_refused_naming_the_store_and_the_holder(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.sqlite3"
    first = await CandleStore.open(db, lock=True)
    try:
        assert lock_path(db).read_text().strip() == str(os.getpid())
        with pytest.raises(StoreInUse) as refused:
            await CandleStore.open(db, lock=True)
        message = str(refused.value)
        assert str(db) in message and f"pid {os.getpid()}" in message
        # a one-shot tool (import, export, migrate-store) takes no lock: it opens beside it
        tool = await CandleStore.open(db)
        await tool.aclose()
    finally:
        await first.aclose()
    # closed: the lock is free again, the file stays (flock: nothing stale to clean up)
    again = await CandleStore.open(db, lock=True)
    await again.aclose()
    assert lock_path(db).exists()


async def test_the_lock_is_taken_before_the_migration(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    schema_1_store(db)
    # another process's lock on the file (a flock of an open of its own)
    with os.fdopen(os.open(lock_path(db), os.O_RDWR | os.O_CREAT, 0o600), "rb") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(StoreInUse):
            await CandleStore.open(db, lock=True)
    assert user_version(db) == 1  # refused before anything was migrated


def test_which_daemons_take_the_lock() -> None:
    sqlite, pg = Path("m.sqlite3"), "postgresql://postgres@127.0.0.1/x"
    assert takes_writer_lock(sqlite, "all") and takes_writer_lock(pg, "all")
    assert takes_writer_lock(sqlite, "ingest") and takes_writer_lock(pg, "ingest")
    assert not takes_writer_lock(sqlite, "edge") and not takes_writer_lock(pg, "edge")
    # shared on PostgreSQL only: several ingest nodes (the lease picks the writer), and a
    # role all daemon kept out; a SQLite store has one ingesting daemon
    assert shares_writer_lock(pg, "ingest") and not shares_writer_lock(sqlite, "ingest")
    assert not shares_writer_lock(pg, "all") and not shares_writer_lock(sqlite, "all")


async def test_opening_says_what_it_did_to_the_schema(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old, new = tmp_path / "old.sqlite3", tmp_path / "new.sqlite3"
    schema_1_store(old)
    caplog.set_level("INFO")
    store = await open_served_store(old, "all")
    await store.aclose()
    lines = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    assert len(lines) == 1
    assert lines[0].startswith(f"candle store {old}: schema 1 → {SCHEMA_VERSION} (migrated in ")
    assert lines[0].endswith(" s)")
    assert user_version(old) == SCHEMA_VERSION
    caplog.clear()
    store = await open_served_store(old, "all")
    await store.aclose()
    current = [r.getMessage() for r in caplog.records if "schema" in r.getMessage()]
    assert current == [f"candle store {old}: schema {SCHEMA_VERSION} (current)"]
    fresh = await CandleStore.open(new)
    assert fresh.schema is not None and fresh.schema.before == 0
    assert fresh.schema.line().startswith(f"candle store {new}: schema 0 → {SCHEMA_VERSION}")
    await fresh.aclose()


async def test_a_store_newer_than_this_release_is_refused_with_advice_for_a_rollback(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.sqlite3"
    await (await CandleStore.open(db)).aclose()
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreTooNew) as refused:
        await CandleStore.open(db, lock=True)
    assert str(refused.value) == (
        f"candle store {db} has schema {SCHEMA_VERSION + 1}, newer than this tradecanvas"
        f" writes ({SCHEMA_VERSION}): run the release that wrote it, or restore a backup"
        " taken before the upgrade"
    )
    assert "upgrade tradecanvas" not in str(refused.value)
    # the lock taken for the open was let go with the refusal
    with lock_path(db).open("rb") as file:
        fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    code, line, traceback = start_failure(BaseExceptionGroup("", [refused.value])) or (0, "", 1)
    assert code == ExitCode.STORE_TOO_NEW and not traceback
    assert line == f"cannot start (exit code 4): {refused.value}"


def test_a_store_in_use_is_exit_3_said_as_a_refusal() -> None:
    busy = StoreInUse("candle store m.sqlite3 is in use by another tradecanvas serve")
    assert start_failure(BaseExceptionGroup("", [busy])) == (
        ExitCode.STORE_FAILURE,
        f"cannot start (exit code 3): {busy}",
        False,
    )
