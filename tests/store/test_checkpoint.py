"""WAL checkpoints off the commit path: real SQLite files, the checkpointer's own thread.

Waits on events and conditions have a generous timeout only as a safety net against a hang.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.conftest import flat_minutes
from tradecanvas.store.checkpoint import BACKSTOP_PAGES, THREAD_NAME, Checkpointer
from tradecanvas.store.sqlite import CandleStore

SID = "binance:futures:BTC/USDT:1m"
T0 = 1_751_760_000
# a safety net against a hang, never a wait that a test relies on
TIMEOUT = 30.0


def wal_writer(path: Path) -> sqlite3.Connection:
    """A WAL database with one table and no checkpoint of its own."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (x BLOB)")
    return conn


def checkpoint_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == THREAD_NAME}


class Probe:
    """A ``connect`` for the Checkpointer that records what its real connections do: the
    thread of each checkpoint, connects and closes; it can fail the first connects or
    checkpoints and hold a checkpoint at a gate."""

    def __init__(self, path: Path, *, failing_connects: int = 0, failing_checkpoints: int = 0):
        self.path = path
        self.failing_connects = failing_connects
        self.failing_checkpoints = failing_checkpoints
        self.connects = 0
        self.closes: list[int] = []  # thread of each close
        self.checkpoints: list[int] = []  # thread of each checkpoint that ran
        self.entered = threading.Event()  # a checkpoint started
        self.gate = threading.Event()  # a checkpoint waits here until set
        self.gate.set()

    def connect(self) -> sqlite3.Connection:
        self.connects += 1
        if self.connects <= self.failing_connects:
            raise sqlite3.OperationalError("unable to open database file")
        # check_same_thread stays on: the connection must live on the thread that made it
        conn = sqlite3.connect(self.path, factory=ProbedConnection)
        assert isinstance(conn, ProbedConnection)
        conn.probe = self
        return conn


class ProbedConnection(sqlite3.Connection):
    probe: Probe

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        probe = self.probe
        if sql.startswith("PRAGMA wal_checkpoint"):
            probe.entered.set()
            assert probe.gate.wait(TIMEOUT)
            if probe.failing_checkpoints > 0:
                probe.failing_checkpoints -= 1
                raise sqlite3.OperationalError("database is locked")
            probe.checkpoints.append(threading.get_ident())
        return super().execute(sql, parameters)

    def close(self) -> None:
        self.probe.closes.append(threading.get_ident())
        super().close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "db.sqlite3"
    wal_writer(path).close()
    return path


def test_a_checkpoint_after_a_write_copies_the_wal_into_the_database_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "db.sqlite3"
    writer = wal_writer(path)
    writer.executemany("INSERT INTO t VALUES (?)", [(bytes(1000),)] * 200)
    before = path.stat().st_size  # the rows are in the WAL only
    checkpoints = Checkpointer(lambda: sqlite3.connect(path, check_same_thread=False))
    checkpoints.after_write()
    assert checkpoints.wait_idle(TIMEOUT)
    assert path.stat().st_size > before + 150 * 1000  # before close
    checkpoints.close()
    # closed: no more checkpoints, and the writer still works
    checkpoints.after_write()
    writer.execute("INSERT INTO t VALUES (1)")
    assert writer.execute("SELECT count(*) FROM t").fetchone() == (201,)
    writer.close()


def test_one_thread_and_one_connection_run_every_checkpoint(db: Path) -> None:
    before = checkpoint_threads()
    probe = Probe(db)
    checkpoints = Checkpointer(probe.connect, interval_s=0)
    assert checkpoint_threads() == before  # started by the first write, not before
    for _ in range(20):
        checkpoints.after_write()
        assert checkpoints.wait_idle(TIMEOUT)
        assert len(checkpoint_threads() - before) == 1
    (thread,) = checkpoint_threads() - before
    assert thread.daemon
    assert probe.checkpoints == [thread.ident] * 20
    assert probe.connects == 1
    checkpoints.close()
    assert probe.closes == [thread.ident]  # on the thread that made it
    assert checkpoint_threads() == before


def test_writes_while_a_checkpoint_runs_ask_for_one_more(db: Path) -> None:
    probe = Probe(db)
    probe.gate.clear()
    checkpoints = Checkpointer(probe.connect, interval_s=0)
    checkpoints.after_write()
    assert probe.entered.wait(TIMEOUT)
    # the checkpoint is held at the gate: these return at once, and only ask
    for _ in range(5):
        checkpoints.after_write()
    assert not checkpoints.wait_idle(0)
    probe.gate.set()
    assert checkpoints.wait_idle(TIMEOUT)
    assert len(probe.checkpoints) == 2
    checkpoints.close()


def test_close_lets_the_running_checkpoint_finish_then_joins_the_thread(db: Path) -> None:
    before = checkpoint_threads()
    probe = Probe(db)
    probe.gate.clear()
    checkpoints = Checkpointer(probe.connect, interval_s=0)
    checkpoints.after_write()
    assert probe.entered.wait(TIMEOUT)
    checkpoints.after_write()  # pending behind the running one
    closer = threading.Thread(target=checkpoints.close)
    closer.start()
    # only the close can end this wait: a checkpoint runs and another is asked for
    assert checkpoints.wait_idle(TIMEOUT)
    assert closer.is_alive()  # close waits for the checkpoint held at the gate
    probe.gate.set()
    closer.join(TIMEOUT)
    assert not closer.is_alive()
    assert len(probe.checkpoints) == 1  # the pending one was dropped
    assert len(probe.closes) == 1
    assert checkpoint_threads() == before
    # closed: a write starts nothing
    checkpoints.after_write()
    assert checkpoint_threads() == before
    assert (probe.connects, len(probe.checkpoints)) == (1, 1)
    checkpoints.close()  # again: nothing to do


def test_after_close_a_write_starts_nothing(db: Path) -> None:
    before = checkpoint_threads()
    probe = Probe(db)
    checkpoints = Checkpointer(probe.connect, interval_s=0)
    checkpoints.close()  # before any write: no thread to stop
    checkpoints.after_write()
    assert checkpoints.wait_idle(TIMEOUT)
    assert checkpoint_threads() == before
    assert probe.connects == 0


def test_a_write_within_the_interval_asks_for_no_checkpoint(db: Path) -> None:
    probe = Probe(db)
    checkpoints = Checkpointer(probe.connect, interval_s=3600)
    checkpoints.after_write()  # the first runs at once
    assert checkpoints.wait_idle(TIMEOUT)
    checkpoints.after_write()  # within the hour: nothing asked (it would run at once)
    assert checkpoints.wait_idle(TIMEOUT)
    checkpoints.close()
    assert len(probe.checkpoints) == 1


@pytest.mark.parametrize(
    ("failing", "logged", "connects_after_retry"),
    [
        # a failing connect: the next request connects again
        ({"failing_connects": 1}, "WAL checkpoint failed", 2),
        # a failing checkpoint: the next one runs on the same connection
        ({"failing_checkpoints": 1}, "database is locked", 1),
    ],
)
def test_a_failed_checkpoint_is_logged_and_retried_by_the_next_request(
    db: Path,
    caplog: pytest.LogCaptureFixture,
    failing: dict[str, int],
    logged: str,
    connects_after_retry: int,
) -> None:
    probe = Probe(db, **failing)
    checkpoints = Checkpointer(probe.connect, interval_s=0)
    with caplog.at_level(logging.WARNING, logger="tradecanvas.store.checkpoint"):
        checkpoints.after_write()
        assert checkpoints.wait_idle(TIMEOUT)
    assert logged in caplog.text
    assert probe.checkpoints == []
    checkpoints.after_write()
    assert checkpoints.wait_idle(TIMEOUT)
    assert (probe.connects, len(probe.checkpoints)) == (connects_after_retry, 1)
    checkpoints.close()


def test_repeated_failures_are_counted_and_said_once_per_kind(
    db: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """On a full disk every checkpoint fails, up to 10 a second: it was a line each."""
    probe = Probe(db, failing_connects=1, failing_checkpoints=5)
    checkpoints = Checkpointer(probe.connect, interval_s=0)
    with caplog.at_level(logging.WARNING, logger="tradecanvas.store.checkpoint"):
        for _ in range(7):
            checkpoints.after_write()
            assert checkpoints.wait_idle(TIMEOUT)
    lines = [r.getMessage() for r in caplog.records]
    # one line for the failing connect, one for the first failing checkpoint; the four
    # after it wait for the interval (and their count goes in the next line)
    assert len(lines) == 2, lines
    assert "unable to open database file (1 time since" in lines[0]
    assert "database is locked (1 time since" in lines[1]
    assert checkpoints.failures == 6 and len(probe.checkpoints) == 1
    checkpoints.close()


def test_a_failing_checkpoint_leaves_the_writer_alone(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite3"
    writer = wal_writer(path)

    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("unable to open database file")

    checkpoints = Checkpointer(broken)
    checkpoints.after_write()
    checkpoints.close()
    writer.execute("INSERT INTO t VALUES (1)")
    writer.close()


def candles_in_the_database_file(path: Path) -> int:
    """The candles in the main database file alone: ``immutable=1`` ignores the WAL (and
    locks), so this counts what checkpoints copied into the file."""
    conn = sqlite3.connect(f"file:{path}?immutable=1", uri=True)
    try:
        tables = conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'candles'")
        if tables.fetchone() == (0,):
            return 0  # not even the schema was checkpointed
        (count,) = conn.execute("SELECT count(*) FROM candles").fetchone()
        assert isinstance(count, int)
        return count
    finally:
        conn.close()


async def test_the_store_checkpoints_beside_its_commits_while_open(tmp_path: Path) -> None:
    """The writer's own threshold is only the backstop; a write asks the checkpointer, which
    copies the WAL into the database file while the store stays open."""
    path = tmp_path / "market.sqlite3"
    store = await CandleStore.open(path)
    try:
        assert store._writer.execute("PRAGMA wal_autocheckpoint").fetchone() == (BACKSTOP_PAGES,)
        await store.upsert(SID, list(flat_minutes(T0, 500)), "ws")
        assert await trio.to_thread.run_sync(store._checkpointer.wait_idle, TIMEOUT)
        assert candles_in_the_database_file(path) == 500
    finally:
        await store.aclose()


async def test_without_the_checkpointer_the_rows_stay_in_the_wal_until_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The counterpart of the test above: with after_write doing nothing, the same read of
    the file finds none of the rows while the store is open (the backstop is far off), so
    that test fails if the checkpoints were stubbed out. Only the close copies them."""

    def no_checkpoint(self: Checkpointer) -> None:
        pass

    monkeypatch.setattr(Checkpointer, "after_write", no_checkpoint)
    path = tmp_path / "market.sqlite3"
    store = await CandleStore.open(path)
    try:
        await store.upsert(SID, list(flat_minutes(T0, 500)), "ws")
        assert await trio.to_thread.run_sync(store._checkpointer.wait_idle, TIMEOUT)
        assert len(await store.range(SID, T0, T0 + 500 * 60)) == 500  # committed, in the WAL
        assert candles_in_the_database_file(path) == 0
    finally:
        await store.aclose()
    assert candles_in_the_database_file(path) == 500  # the last connection's close
