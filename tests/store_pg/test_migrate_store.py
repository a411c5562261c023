"""``tradecanvas migrate-store``: a SQLite store moved into PostgreSQL, everything equal,
event ids kept, and a second run changes nothing."""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
from decimal import Decimal
from pathlib import Path

import attrs
import psycopg
import pytest
import trio

from tests.cli_rig import cli_env, exit_code_within, run_cli
from tests.conftest import candle, flat_minutes
from tradecanvas.errors import ExitCode
from tradecanvas.store.open import MIGRATION_MARK
from tradecanvas.store.postgres import PostgresStore
from tradecanvas.store.sqlite import CandleStore, StoreTxn
from tradecanvas.store.types import UpsertOutcome
from tradecanvas.tools.migrate_store import (
    EXIT_CODES,
    EventIdTaken,
    migrate_store,
    run_migrate_store,
)

BTC = "binance:futures:BTC/USDT:1m"
BTC5 = "binance:futures:BTC/USDT:5m"


async def _fill(path: Path) -> list[int]:
    store = await CandleStore.open(path)
    await store.upsert(BTC, list(flat_minutes(0, 250)), "rest")
    rich = attrs.evolve(
        candle(250 * 60, "1.50", "2", "1", "2.0"), trades=4, quote_volume=Decimal("1E-8")
    )
    await store.upsert(BTC, [rich], "ws")
    await store.upsert(
        BTC5, [candle(0, "100", "100", "100", "100", "5")], "derived", complete=False
    )

    def log(txn: StoreTxn) -> list[int]:
        ids = [
            txn.append_event(BTC, "factor.rebuild", {"reason": "new_series", "n": i}, 5.0)
            for i in range(5)
        ]
        txn.prune_events(3, 0.0)  # the first two go: the retention mark is ids[1]
        txn.set_meta("derivation_fingerprint", "binance-exact-v1;derived=5m")
        return ids

    ids = await store.write(log)
    await store.aclose()
    return ids


async def test_everything_is_copied_and_a_second_run_changes_nothing(
    tmp_path: Path, pg_url: str
) -> None:
    path = tmp_path / "m.sqlite3"
    ids = await _fill(path)
    target = await PostgresStore.open(pg_url)
    seen: list[tuple[str, int, int]] = []
    tally = await migrate_store(path, target, batch=100, progress=lambda *a: seen.append(a))
    assert tally.candles == {UpsertOutcome.NEW: 252}
    assert (tally.series, tally.events_copied, tally.events_present) == (2, 3, 0)
    assert seen[:4] == [(BTC, 0, 251), (BTC, 100, 251), (BTC, 200, 251), (BTC, 251, 251)]
    source = await CandleStore.open(path)
    for sid in (BTC, BTC5):
        lite, pg = await source.range(sid, 0, 10**9), await target.range(sid, 0, 10**9)
        assert pg == lite
        assert [str(s.candle.open) + str(s.candle.quote_volume) for s in pg] == [
            str(s.candle.open) + str(s.candle.quote_volume) for s in lite
        ]
    assert await target.events_after(0) == await source.events_after(0)
    assert [e.event_id for e in await target.events_after(0)] == ids[2:]
    assert await target.events_pruned_upto() == ids[1]
    assert await target.get_meta("derivation_fingerprint") == "binance-exact-v1;derived=5m"
    again = await migrate_store(path, target)
    assert again.candles == {UpsertOutcome.UNCHANGED: 252}
    assert (again.events_copied, again.events_present) == (0, 3)
    # the file's daemon went on: its retention dropped an event the target holds, and it
    # added one; the rerun (the target's log is the file's, the dropped id below its
    # retention mark) is accepted and copies the new one
    newest = await source.write(
        lambda txn: [txn.append_event(BTC, "gap", {"n": 9}, 7.0), txn.prune_events(3, 0.0)][0]
    )
    assert await source.events_pruned_upto() == ids[2]
    third = await migrate_store(path, target)
    assert (third.events_copied, third.events_present) == (1, 2)
    assert [e.event_id for e in await target.events_after(0)] == [*ids[2:], newest]
    assert await target.events_pruned_upto() == ids[2]
    # the ids PostgreSQL gives next stay above the imported ones
    assert await target.write(lambda txn: txn.append_event(BTC, "gap", {}, 6.0)) > newest
    await source.aclose()
    await target.aclose()


async def test_a_path_with_a_hash_or_question_mark_is_read_as_named(
    tmp_path: Path, pg_url: str
) -> None:
    """The read-only URI was ``file:{path}?mode=ro`` unquoted: ``#`` or ``?`` ended the
    name, and SQLite opened (made) another, empty file read-write."""
    folder = tmp_path / "backups #2?x=1"
    folder.mkdir()
    path = folder / "m%41.sqlite3"
    await _fill(path)
    target = await PostgresStore.open(pg_url)
    try:
        tally = await migrate_store(path, target)
        assert tally.candles == {UpsertOutcome.NEW: 252}
    finally:
        await target.aclose()
    assert os.listdir(tmp_path) == [folder.name]  # no new file
    assert set(os.listdir(folder)) <= {f"{path.name}{s}" for s in ("", "-wal", "-shm")}


def test_the_command_reports_and_refuses_bad_arguments(tmp_path: Path, pg_url: str) -> None:
    path = tmp_path / "m.sqlite3"
    trio.run(_fill, path)
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(sqlite_file=path, database_url=pg_url, batch=1000)
    assert run_migrate_store(args, out=out, err=err) == ExitCode.OK
    assert "2 series: 252 new, 0 unchanged, 0 revised candles; 3 events copied" in out.getvalue()
    assert f"{BTC}: 251/251 candles (100%)" in err.getvalue()
    missing = argparse.Namespace(sqlite_file=tmp_path / "nope", database_url=pg_url, batch=10)
    assert run_migrate_store(missing, out=out, err=err) == ExitCode.USAGE
    (tmp_path / "notes.txt").write_text("not a database\n")
    for bad, why in ((tmp_path / "notes.txt", "not a SQLite file"), (tmp_path, "a folder")):
        args = argparse.Namespace(sqlite_file=bad, database_url=pg_url, batch=10)
        assert run_migrate_store(args, out=out, err=err) == ExitCode.USAGE
        assert f"{bad}: {why}" in err.getvalue()
    not_pg = argparse.Namespace(sqlite_file=path, database_url="mysql://x/y", batch=10)
    assert run_migrate_store(not_pg, out=out, err=err) == ExitCode.USAGE
    # no database name: the tables would go into the server's own database
    unnamed = argparse.Namespace(sqlite_file=path, database_url="postgresql://127.0.0.1/", batch=1)
    assert run_migrate_store(unnamed, out=out, err=err) == ExitCode.USAGE
    assert "the target: no database name" in err.getvalue()
    down = argparse.Namespace(sqlite_file=path, database_url="postgresql://127.0.0.1:1/x", batch=1)
    assert run_migrate_store(down, out=out, err=err) == ExitCode.STORE_FAILURE
    assert "127.0.0.1:1/x" in err.getvalue()
    from tradecanvas.tools import migrate_store as module

    assert module.__doc__ is not None
    paragraph = module.__doc__.split("Exit codes")[1].split("\n\n")[0]
    assert {int(n) for n in re.findall(r"\b\d+\b", paragraph)} == {int(c) for c, _ in EXIT_CODES}


async def test_another_event_under_a_taken_id_stops_the_run(tmp_path: Path, pg_url: str) -> None:
    """A daemon wrote its own events to the database first: the SQLite file's events under
    the same ids are not counted "already there" (lost); the run stops with exit 1 and the
    target's log keeps its own."""
    path = tmp_path / "m.sqlite3"
    await _fill(path)
    target = await PostgresStore.open(pg_url)
    own = await target.write(
        lambda txn: [txn.append_event(BTC5, "series.added", {"n": i}, 1.0) for i in range(4)]
    )
    before = await target.events_after(0)
    await target.aclose()
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(sqlite_file=path, database_url=pg_url, batch=1000)
    code = await trio.to_thread.run_sync(lambda: run_migrate_store(args, out=out, err=err))
    assert code == ExitCode.FAILED
    assert f"holds another event under event_id {own[2]}" in err.getvalue()
    assert "nothing was written to the target" in err.getvalue()
    target = await PostgresStore.open(pg_url)
    assert await target.events_after(0) == before
    assert await target.range(BTC, 0, 10**9) == []  # no candle copied before the refusal
    await target.aclose()


async def test_a_daemon_writing_during_the_run_is_still_caught_and_the_message_says_so(
    tmp_path: Path, pg_url: str
) -> None:
    """The check before the first write cannot see an event written while the run goes
    on: the event log's import still stops it, and the message says the candles were
    copied (it said nothing of them). The run's mark does not stay behind."""
    path = tmp_path / "m.sqlite3"
    ids = await _fill(path)
    target = await PostgresStore.open(pg_url)

    def daemon_writes(sid: str, done: int, total: int) -> None:
        if sid == BTC5 and done == 0:  # between the two series' candles
            with psycopg.connect(pg_url, autocommit=True) as conn:
                conn.execute("INSERT INTO events VALUES (%s, %s, 'gap', '{}', 1.0)", (ids[2], BTC5))

    with pytest.raises(EventIdTaken) as caught:
        await migrate_store(path, target, batch=100, progress=daemon_writes)
    assert caught.value.event_id == ids[2] and caught.value.written
    assert "its candles were copied before a daemon wrote this event" in str(caught.value)
    assert len(await target.range(BTC, 0, 10**9)) == 251
    assert await target.get_meta(MIGRATION_MARK) is None
    await target.aclose()


async def test_a_read_only_copy_migrates_and_sigterm_stops_after_the_batch(
    tmp_path: Path, pg_url: str
) -> None:
    """A backup the user may not write is only read (chattr +i stands for another owner);
    SIGTERM stops after the batch in flight with 143 and a line saying so (it used to exit
    without a word), and the next run finishes."""
    path = tmp_path / "m.sqlite3"
    store = await CandleStore.open(path)
    await store.upsert(BTC, list(flat_minutes(0, 40_000)), "rest")
    await store.aclose()
    if (await trio.run_process(["chattr", "+i", str(path)], check=False)).returncode != 0:
        pytest.skip("chattr +i does not work on this file system")
    try:
        log = tmp_path / "migrate.log"
        args = ["migrate-store", str(path), pg_url, "--batch", "100"]
        with run_cli(args, cli_env(), log) as proc:
            await _until_copied(pg_url, at_least=1)
            proc.send_signal(signal.SIGTERM)
            assert await exit_code_within(proc, 60) == ExitCode.TERMINATED
        assert "interrupted; what was copied stays, run it again to finish" in log.read_text()
        copied = await _copied(pg_url)
        assert 0 < copied < 40_000
        with run_cli(args, cli_env(), tmp_path / "again.log") as proc:
            assert await exit_code_within(proc, 120) == ExitCode.OK
        assert await _copied(pg_url) == 40_000
    finally:
        await trio.run_process(["chattr", "-i", str(path)])


async def _copied(pg_url: str) -> int:
    target = await PostgresStore.open(pg_url)
    try:
        return len(await target.range(BTC, 0, 10**9))
    finally:
        await target.aclose()


async def _until_copied(pg_url: str, at_least: int) -> None:
    with trio.fail_after(60):
        while True:
            if await _copied(pg_url) >= at_least:
                return
            await trio.sleep(0.05)  # polling the target's rows, not waiting out a race


ETH = "binance:spot:ETH/USDT:1m"


def _snapshot(pg_url: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row the target holds, table by table (the write counter included)."""
    tables = {
        "candles": "SELECT * FROM candles ORDER BY series_id, candle_time",
        "events": "SELECT * FROM events ORDER BY event_id",
        "meta": "SELECT * FROM meta ORDER BY key",
        "event_counter": "SELECT * FROM event_counter",
        "write_counter": "SELECT * FROM write_counter",
    }
    with psycopg.connect(pg_url) as conn:
        return {name: list(conn.execute(sql)) for name, sql in tables.items()}


async def _run_command(path: Path, pg_url: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    args = argparse.Namespace(sqlite_file=path, database_url=pg_url, batch=100)
    code = await trio.to_thread.run_sync(lambda: run_migrate_store(args, out=out, err=err))
    return code, out.getvalue(), err.getvalue()


async def test_a_target_with_events_of_its_own_is_refused_before_anything_is_written(
    tmp_path: Path, pg_url: str
) -> None:
    """The bulk review's D2: a database someone imported into (candles and events 1..n of
    its own) was refused with exit 1 only after every candle of the SQLite file had been
    copied into it. The clash is found before the first write: nothing changes, and the
    message says so. The same database with candles but no events is merged into."""
    path = tmp_path / "m.sqlite3"
    await _fill(path)
    target = await PostgresStore.open(pg_url)
    await target.upsert(ETH, list(flat_minutes(0, 30)), "rest")
    await target.write(
        lambda txn: [txn.append_event(ETH, "series.added", {"n": i}, 1.0) for i in range(2)]
    )
    await target.aclose()
    before = await trio.to_thread.run_sync(_snapshot, pg_url)
    code, out, err = await _run_command(path, pg_url)
    assert code == ExitCode.FAILED, err
    assert "holds another event under event_id 1 (the SQLite file has none under it)" in err
    assert "nothing was written to the target" in err
    assert "candles copied" not in err and out == ""
    assert await trio.to_thread.run_sync(_snapshot, pg_url) == before
    # no events (a store imported into whose log was emptied): the candles are merged
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DELETE FROM events")
    code, out, err = await _run_command(path, pg_url)
    assert code == ExitCode.OK, err
    assert "2 series: 252 new, 0 unchanged, 0 revised candles; 3 events copied" in out
    target = await PostgresStore.open(pg_url)
    assert len(await target.range(ETH, 0, 10**9)) == 30
    assert len(await target.range(BTC, 0, 10**9)) == 251
    await target.aclose()


async def test_events_a_daemon_wrote_after_a_completed_migration_refuse_a_rerun(
    tmp_path: Path, pg_url: str
) -> None:
    """The daemon ran on the database after the migration (events above every id the file
    gave): a rerun used to count the file's events "already there" and copy its candles over
    the daemon's (REVISED) and its meta over the daemon's. It is refused, nothing written."""
    path = tmp_path / "m.sqlite3"
    ids = await _fill(path)
    code, _, err = await _run_command(path, pg_url)
    assert code == ExitCode.OK, err
    target = await PostgresStore.open(pg_url)
    await target.upsert(BTC, [candle(0, "7", "7", "7", "7")], "ws")  # the daemon's revision
    newer = await target.write(lambda txn: txn.append_event(BTC, "gap", {"from": 0}, 9.0))
    await target.set_meta("derivation_fingerprint", "binance-exact-v1;derived=5m,15m")
    await target.aclose()
    assert newer > ids[-1]
    before = await trio.to_thread.run_sync(_snapshot, pg_url)
    code, out, err = await _run_command(path, pg_url)
    assert code == ExitCode.FAILED, out
    assert f"holds another event under event_id {newer} (the SQLite file has none" in err
    assert await trio.to_thread.run_sync(_snapshot, pg_url) == before
