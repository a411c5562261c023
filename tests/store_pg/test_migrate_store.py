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
import pytest
import trio

from tests.cli_rig import cli_env, exit_code_within, run_cli
from tests.conftest import candle, flat_minutes
from tradecanvas.errors import ExitCode
from tradecanvas.store.postgres import PostgresStore
from tradecanvas.store.sqlite import CandleStore, StoreTxn
from tradecanvas.store.types import UpsertOutcome
from tradecanvas.tools.migrate_store import EXIT_CODES, migrate_store, run_migrate_store

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
    # the ids PostgreSQL gives next stay above the imported ones
    assert await target.write(lambda txn: txn.append_event(BTC, "gap", {}, 6.0)) > ids[-1]
    again = await migrate_store(path, target)
    assert again.candles == {UpsertOutcome.UNCHANGED: 252}
    assert (again.events_copied, again.events_present) == (0, 3)
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
    target = await PostgresStore.open(pg_url)
    assert await target.events_after(0) == before
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
