"""Upgrades and rollbacks on PostgreSQL: serve's lock for role ``all`` (one such daemon per
database; taken again after its session ended), the refusal of a database newer than this
release, and a ``migrate-store`` killed half-way, which ``serve`` refuses until a rerun
finished it. Real PostgreSQL, real CLI subprocesses for the end-to-end parts."""

from __future__ import annotations

import argparse
import io
import os
import signal
import sqlite3
from pathlib import Path

import psycopg
import pytest
import trio

from tests.cli_rig import cli_env, exit_code_within, run_cli, wait_for_line
from tests.conftest import flat_minutes
from tests.store_pg.test_migrate_store import BTC, _fill, _until_copied
from tests.store_pg.test_serve_lock import wait_until_free
from tradecanvas.errors import ExitCode, StoreError, StoreInUse, StoreTooNew, start_failure
from tradecanvas.store.open import MIGRATION_MARK, open_served_store
from tradecanvas.store.pg_schema import SCHEMA_VERSION
from tradecanvas.store.postgres import PostgresStore
from tradecanvas.store.schema import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.writer_lock import PgServeLock
from tradecanvas.tools.migrate_store import run_migrate_store

# no Binance here: an unreachable loopback port keeps the ingest reconnecting
NO_UPSTREAM = {
    "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": "ws://127.0.0.1:9/market",
    "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": "http://127.0.0.1:9",
}


def _terminate_lock_session(pg_url: str, pid: int) -> int:
    """End the serve lock's session of process ``pid`` (as a server restart would)."""
    with psycopg.connect(pg_url, autocommit=True) as conn:
        rows = conn.execute(
            # waits (up to 10 s) until the backend is gone and its locks with it
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity"
            " WHERE application_name LIKE %s AND datname = current_database()",
            (f"tradecanvas serve pid {pid} %",),
        ).fetchall()
    return len(rows)


async def test_a_second_role_all_daemon_is_refused_and_the_lock_is_taken_again(
    pg_url: str,
) -> None:
    first = await PostgresStore.open(pg_url, lock=True)
    try:
        with pytest.raises(StoreInUse) as refused:
            await PostgresStore.open(pg_url, lock=True)
        assert f"tradecanvas serve pid {os.getpid()} on " in str(refused.value)
        assert pg_url.rsplit("/", 1)[1] in str(refused.value)
        # roles ingest and edge on PostgreSQL take no such lock; nor do the tools
        other = await open_served_store(pg_url, "edge")
        await other.aclose()
        assert first.lock is not None and first.lock.held
        # its session ended (a server restart): kept again at the next check
        assert await trio.to_thread.run_sync(_terminate_lock_session, pg_url, os.getpid()) == 1
        await trio.to_thread.run_sync(first.lock.keep)
        assert first.lock.held
        # ended again, and another daemon took the lock meanwhile: this one must stop
        assert await trio.to_thread.run_sync(_terminate_lock_session, pg_url, os.getpid()) == 1
        second = await PostgresStore.open(pg_url, lock=True)
        try:
            with pytest.raises(StoreInUse) as lost:
                await trio.to_thread.run_sync(first.lock.keep)
            said = start_failure(BaseExceptionGroup("", [lost.value]))
            assert said is not None and said[1].startswith("stopping (exit code 3): ")
        finally:
            await second.aclose()
    finally:
        await first.aclose()
    await trio.to_thread.run_sync(wait_until_free, pg_url)
    again = await PostgresStore.open(pg_url, lock=True)  # closed: free again
    await again.aclose()


async def test_a_database_newer_than_this_release_is_refused_naming_it(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url)
    await store.aclose()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreTooNew) as refused:
        await PostgresStore.open(pg_url, lock=True)
    message = str(refused.value)
    assert f"has schema {SCHEMA_VERSION + 1}, newer than this tradecanvas writes" in message
    assert "restore a backup taken before the upgrade" in message
    assert pg_url.rsplit("/", 1)[1] in message
    wait_until_free(pg_url)  # the refused open let go of it (its session ends on the server)
    lock = PgServeLock.take(pg_url)
    lock.close()


def _serve_env(tmp_path: Path, pg_url: str) -> dict[str, str]:
    return cli_env(
        TRADE_CANVAS_DB_PATH=str(tmp_path / "unused.sqlite3"),
        TRADE_CANVAS_DATABASE_URL=pg_url,
        **NO_UPSTREAM,
    )


@pytest.mark.e2e
async def test_two_role_all_daemons_on_one_database(tmp_path: Path, pg_url: str) -> None:
    env = _serve_env(tmp_path, pg_url)
    log = tmp_path / "first.log"
    with run_cli(["serve"], env, log) as first:
        await wait_for_line(log, r"tradecanvas ready ", first, within=60)
        with run_cli(["serve"], env, tmp_path / "second.log") as second:
            assert await exit_code_within(second, 60) == ExitCode.STORE_FAILURE
        refusal = (tmp_path / "second.log").read_text()
        assert "cannot start (exit code 3): candle store " in refusal
        holder = f"another tradecanvas serve of role all (tradecanvas serve pid {first.pid} "
        assert holder in refusal
        assert first.poll() is None  # the first one runs on
        first.send_signal(signal.SIGTERM)
        assert await exit_code_within(first, 30) == ExitCode.OK
    with run_cli(["serve"], env, tmp_path / "third.log") as third:  # the lock went with it
        await wait_for_line(tmp_path / "third.log", r"tradecanvas ready ", third, within=60)
        third.send_signal(signal.SIGTERM)
        assert await exit_code_within(third, 30) == ExitCode.OK


async def _fill_large(path: Path) -> None:
    store = await CandleStore.open(path)
    await store.upsert(BTC, list(flat_minutes(0, 40_000)), "rest")
    await store.write(lambda txn: txn.append_event(BTC, "gap", {"n": 1}, 1.0))
    await store.aclose()


async def _events(pg_url: str) -> int:
    with psycopg.connect(pg_url) as conn:
        row = conn.execute("SELECT count(*) FROM events").fetchone()
    return 0 if row is None else int(row[0])


@pytest.mark.e2e
async def test_a_killed_migrate_store_is_refused_by_serve_until_a_rerun_finished_it(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "m.sqlite3"
    await _fill_large(path)
    args = ["migrate-store", str(path), pg_url, "--batch", "100"]
    with run_cli(args, cli_env(), tmp_path / "migrate.log") as proc:
        await _until_copied(pg_url, at_least=1)
        proc.send_signal(signal.SIGKILL)  # no handler runs: as a crash or an OOM kill
        assert await exit_code_within(proc, 30) == -signal.SIGKILL
    env = _serve_env(tmp_path, pg_url)
    for role in ("all", "edge"):  # every role refuses it
        with pytest.raises(StoreError, match="a migrate-store into this database did not"):
            await open_served_store(pg_url, role)
    with run_cli(["serve"], env, tmp_path / "serve.log") as serve:
        assert await exit_code_within(serve, 60) == ExitCode.STORE_FAILURE
    said = (tmp_path / "serve.log").read_text()
    assert (
        "did not finish (from " + str(path) + "): run the same migrate-store command again"
    ) in said
    assert await _events(pg_url) == 0  # the refused daemon wrote nothing
    with run_cli(args, cli_env(), tmp_path / "again.log") as proc:
        assert await exit_code_within(proc, 180) == ExitCode.OK
    assert await _events(pg_url) == 1
    with run_cli(["serve"], env, tmp_path / "serve2.log") as serve:
        await wait_for_line(tmp_path / "serve2.log", r"tradecanvas ready ", serve, within=60)
        serve.send_signal(signal.SIGTERM)
        assert await exit_code_within(serve, 30) == ExitCode.OK


async def test_a_completed_migration_leaves_no_mark(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "m.sqlite3"
    await _fill(path)
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(sqlite_file=path, database_url=pg_url, batch=1000)
    assert await trio.to_thread.run_sync(lambda: run_migrate_store(args, out=out, err=err)) == 0
    store = await open_served_store(pg_url, "edge")  # not refused
    assert await store.get_meta(MIGRATION_MARK) is None
    await store.aclose()


async def test_migrate_store_from_a_sqlite_file_newer_than_this_release_is_exit_4(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "market.sqlite3"
    await _fill(path)
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version = {SQLITE_SCHEMA_VERSION + 1}")
    conn.close()
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(sqlite_file=path, database_url=pg_url, batch=1000)
    code = await trio.to_thread.run_sync(lambda: run_migrate_store(args, out=out, err=err))
    assert code == ExitCode.STORE_TOO_NEW, err.getvalue()
    assert f"has schema {SQLITE_SCHEMA_VERSION + 1}, newer than" in err.getvalue()


async def test_a_migration_refused_for_taken_event_ids_leaves_no_mark(
    tmp_path: Path, pg_url: str
) -> None:
    """A database with events of its own is not a copy a rerun finishes: its daemon must
    still start after a mistaken migrate-store into it."""
    path = tmp_path / "m.sqlite3"
    await _fill(path)
    target = await PostgresStore.open(pg_url)
    await target.write(
        lambda txn: [txn.append_event(BTC, "series.added", {"n": i}, 1.0) for i in range(4)]
    )
    await target.aclose()
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(sqlite_file=path, database_url=pg_url, batch=1000)
    code = await trio.to_thread.run_sync(lambda: run_migrate_store(args, out=out, err=err))
    assert code == ExitCode.FAILED
    store = await open_served_store(pg_url, "edge")
    assert await store.get_meta(MIGRATION_MARK) is None
    await store.aclose()


async def test_its_own_old_session_still_holding_the_lock_is_waited_for(pg_url: str) -> None:
    """A cut the server has not noticed yet: the daemon's old backend still holds the lock
    when the new connection asks. That is not another daemon: tried again, then taken."""
    store = await PostgresStore.open(pg_url, lock=True)
    try:
        lock = store.lock
        assert lock is not None
        old = lock._conn  # the client's side of the session is lost; the backend lives on
        lock._conn = None
        await trio.to_thread.run_sync(lock.keep)  # no StoreInUse: its own session holds it
        assert not lock.held
        assert old is not None
        with psycopg.connect(pg_url, autocommit=True) as admin:  # the server notices: gone
            admin.execute("SELECT pg_terminate_backend(%s, 10000)", (lock._backend,))
        old.close()
        await trio.to_thread.run_sync(lock.keep)
        assert lock.held
    finally:
        await store.aclose()
