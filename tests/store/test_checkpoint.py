"""WAL checkpoints off the commit path: a real SQLite file, the checkpoint's own thread."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from tests.conftest import flat_minutes
from tradecanvas.store.checkpoint import BACKSTOP_PAGES, Checkpointer
from tradecanvas.store.sqlite import CandleStore

SID = "binance:futures:BTC/USDT:1m"
T0 = 1_751_760_000


def wal_writer(path: Path) -> sqlite3.Connection:
    """A WAL database with one table and no checkpoint of its own."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (x BLOB)")
    return conn


def test_a_checkpoint_after_a_write_copies_the_wal_into_the_database_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite3"
    writer = wal_writer(path)
    writer.executemany("INSERT INTO t VALUES (?)", [(bytes(1000),)] * 200)
    before = path.stat().st_size  # the rows are in the WAL only
    checkpoints = Checkpointer(lambda: sqlite3.connect(path, check_same_thread=False))
    checkpoints.after_write()
    checkpoints.close()  # waits for it
    assert path.stat().st_size > before + 150 * 1000
    # closed: no more checkpoints, and the writer still works
    checkpoints.after_write()
    writer.execute("INSERT INTO t VALUES (1)")
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (201,)
    writer.close()


def test_a_failing_checkpoint_is_logged_and_leaves_the_writer_alone(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    writer = wal_writer(path)

    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    checkpoints = Checkpointer(broken)
    checkpoints.after_write()
    checkpoints.close()
    writer.execute("INSERT INTO t VALUES (1)")
    writer.close()


async def test_the_store_leaves_checkpoints_out_of_its_commits(tmp_path: Path) -> None:
    """The writer's own threshold is only the backstop; a write starts a checkpoint beside
    it, and the store's close waits for it (the data is in the database file after)."""
    path = tmp_path / "market.sqlite3"
    store = await CandleStore.open(path)
    try:
        assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone() == (BACKSTOP_PAGES,)
        await store.upsert(SID, list(flat_minutes(T0, 500)), "ws")
    finally:
        await store.aclose()
    reopened = await CandleStore.open(path)
    try:
        assert len(await reopened.range(SID, T0, T0 + 500 * 60)) == 500
    finally:
        await reopened.aclose()
