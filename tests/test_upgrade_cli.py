"""Upgrades and rollbacks with the real CLI on SQLite: a second daemon on one store is
refused (exit 3, naming the store and the holder's pid), a store newer than this release is
refused with advice for a rollback (exit 4), the migration says what it did, and the
release shows in ``--version``, the ready line and ``tradecanvas_build_info``."""

from __future__ import annotations

import re
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.cli_rig import cli_env, exit_code_within, run_cli, wait_for_line
from tests.conftest import binance_data_dir
from tests.store.test_writer_lock import schema_1_store
from tradecanvas import __version__
from tradecanvas.errors import ExitCode
from tradecanvas.store.pg_schema import SCHEMA_VERSION as PG_SCHEMA_VERSION
from tradecanvas.store.schema import SCHEMA_VERSION

pytestmark = pytest.mark.e2e  # every test here runs the real CLI in subprocesses

# no Binance here: an unreachable loopback port keeps the ingest reconnecting
NO_UPSTREAM = {
    "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": "ws://127.0.0.1:9/market",
    "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": "http://127.0.0.1:9",
}
READY = r"tradecanvas ready .* http=(http://[\d.]+:\d+) .*"


def _env(db: Path) -> dict[str, str]:
    return cli_env(TRADE_CANVAS_DB_PATH=str(db), **NO_UPSTREAM)


def _serve_once(db: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tradecanvas", "serve"],
        env=_env(db),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_a_second_daemon_on_one_sqlite_store_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    log = tmp_path / "first.log"
    with run_cli(["serve"], _env(db), log) as first:
        await wait_for_line(log, READY, first)
        second = _serve_once(db)
        assert second.returncode == ExitCode.STORE_FAILURE
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert "cannot start (exit code 3): candle store " in lines[0]
        assert f"{db} is in use by another tradecanvas serve (pid {first.pid})" in lines[0]
        assert first.poll() is None  # the first one runs on
        first.send_signal(signal.SIGTERM)
        assert await exit_code_within(first, 30) == ExitCode.OK
    # the lock went with the process: the next daemon starts (systemctl restart's order)
    log = tmp_path / "third.log"
    with run_cli(["serve"], _env(db), log) as third:
        await wait_for_line(log, READY, third)
        third.kill()  # even SIGKILL leaves no stale lock: the kernel lets go of it
        assert await exit_code_within(third, 30) == -signal.SIGKILL
    with run_cli(["serve"], _env(db), tmp_path / "fourth.log") as fourth:
        await wait_for_line(tmp_path / "fourth.log", READY, fourth)
        fourth.send_signal(signal.SIGTERM)
        assert await exit_code_within(fourth, 30) == ExitCode.OK


def test_a_store_newer_than_this_release_is_exit_4_with_advice_for_a_rollback(
    tmp_path: Path,
) -> None:
    db = tmp_path / "market.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    refused = _serve_once(db)
    assert refused.returncode == ExitCode.STORE_TOO_NEW
    lines = [line for line in refused.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, refused.stderr
    assert lines[0].endswith(
        f"cannot start (exit code 4): candle store {db} has schema {SCHEMA_VERSION + 1},"
        f" newer than this tradecanvas writes ({SCHEMA_VERSION}): run the release that wrote"
        " it, or restore a backup taken before the upgrade"
    )


ONE_SHOT = {
    "import": [
        "import",
        "--series",
        "binance:futures:BTC/USDT:1m",
        "{data}/klines_1m_5m/futures_um/BTCUSDT-1m-2023-08-16.csv",
    ],
    "export": [
        "export",
        "binance:futures:BTC/USDT:1m",
        "--from",
        "2023-08-16T00:00Z",
        "--to",
        "2023-08-16T01:00Z",
    ],
    "backfill": ["backfill", "binance:futures:BTC/USDT:1m", "--from", "2023-08-16"],
}


@pytest.mark.parametrize("command", sorted(ONE_SHOT))
def test_the_one_shot_tools_exit_4_on_a_store_newer_than_this_release(
    tmp_path: Path, command: str
) -> None:
    """As ``serve``: no rerun helps, and a script can tell a rollback from a failure
    (migrate-store: tests/store_pg/test_upgrade_pg.py)."""
    db = tmp_path / "market.sqlite3"
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    args = [a.format(db=db, data=binance_data_dir()) for a in ONE_SHOT[command]]
    refused = subprocess.run(
        [sys.executable, "-m", "tradecanvas", *args],
        env=_env(db),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert refused.returncode == ExitCode.STORE_TOO_NEW, refused.stderr
    assert f"has schema {SCHEMA_VERSION + 1}, newer than this tradecanvas writes" in (
        refused.stderr
    )


async def test_the_migration_and_the_release_are_said(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    schema_1_store(db)
    log = tmp_path / "serve.log"
    with run_cli(["serve"], _env(db), log) as serve:
        ready = await wait_for_line(log, READY, serve)
        assert ready.group(0).endswith(f" version={__version__}")
        async with httpx.AsyncClient(base_url=ready.group(1)) as client:
            metrics = (await client.get("/metrics")).text
        serve.send_signal(signal.SIGTERM)
        assert await exit_code_within(serve, 30) == ExitCode.OK
    text = log.read_text()
    migrated = re.findall(rf"candle store {re.escape(str(db))}: schema .*", text)
    assert len(migrated) == 1
    assert re.fullmatch(
        rf"candle store \S+: schema 1 → {SCHEMA_VERSION} \(migrated in \d+\.\d\d s\)",
        migrated[0],
    )
    assert (
        f'tradecanvas_build_info{{schema="{SCHEMA_VERSION}",version="{__version__}"}} 1.0'
        in metrics
    )
    log = tmp_path / "again.log"
    with run_cli(["serve"], _env(db), log) as serve:
        await wait_for_line(log, READY, serve)
        serve.send_signal(signal.SIGTERM)
        assert await exit_code_within(serve, 30) == ExitCode.OK
    assert f"candle store {db}: schema {SCHEMA_VERSION} (current)" in log.read_text()


def test_version_names_the_release_and_the_schema_it_writes() -> None:
    shown = subprocess.run(
        [sys.executable, "-m", "tradecanvas", "--version"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert shown.returncode == 0
    assert shown.stdout.strip() == (
        f"tradecanvas {__version__} (candle store schema: SQLite {SCHEMA_VERSION},"
        f" PostgreSQL {PG_SCHEMA_VERSION})"
    )
