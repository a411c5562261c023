"""``tradecanvas backfill`` against ``tradecanvas replay``: :func:`run_import` in this
process, and the real CLI in a subprocess (``e2e``) for output, signals and exit codes.

Binance is played by the replay, run in this process (its REST serves the bars that closed
before its clock, so ``start_at`` sets how much history there is); the store is real SQLite
in tmp_path, compared with Binance's own 1m and 5m CSVs.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio

from tests.conftest import binance_data_dir, read_kline_csv
from tradecanvas.cli import build_parser
from tradecanvas.errors import ExitCode
from tradecanvas.model import Candle
from tradecanvas.runtime_flags import RuntimeFlags, build_runtime_flags
from tradecanvas.store.records import StoreBanMemory
from tradecanvas.store.sqlite import CandleStore, StoredCandle
from tradecanvas.tools.backfill import (
    BACKFILL_WEIGHT_BUDGET,
    BackfillOutcome,
    Progress,
    plan_backfill,
    run_import,
)
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, parse_file_argument, serve_replay
from tradecanvas.upstream.rest import RestPolicy

BASE = "binance:futures:BTC/USDT:1m"
BASE_5M = "binance:futures:BTC/USDT:5m"
DAY = 1_692_144_000  # 2023-08-16, the futures day files
WEEK = 1_751_760_000  # 2025-07-06, the 7-day futures files
FUTURES = Path("klines_1m_5m") / "futures_um"
UNREACHABLE = "http://127.0.0.1:1"
WAIT_S = 60  # an upper bound on any wait here; a hang fails instead of blocking


def csv_rows(name: str) -> list[Candle]:
    return read_kline_csv(binance_data_dir() / FUTURES / name)


def replay_config(name: str, **changes: Any) -> ReplayConfig:
    path = binance_data_dir() / FUTURES / name
    return ReplayConfig(files=(parse_file_argument(str(path), None),), speed=None, **changes)


@contextlib.asynccontextmanager
async def binance_replay(config: ReplayConfig) -> AsyncIterator[ReplayHandle]:
    """The replay, with no WebSocket client: its clock stays at bar ``start_at``."""
    async with trio.open_nursery() as nursery:
        handle: ReplayHandle = await nursery.start(serve_replay, config)
        yield handle
        nursery.cancel_scope.cancel()


def cli_env(db: Path, rest_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update(
        TRADE_CANVAS_DB_PATH=str(db),
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL=rest_url,
        TRADE_CANVAS_BINANCE_SPOT_REST_URL=rest_url,
        # the page arithmetic below assumes 5m (the default set aligns pages to days)
        TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
    )
    env.update(extra)
    return env


BACKFILL = (sys.executable, "-m", "tradecanvas", "backfill")


async def run_backfill(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT_S):
        return await trio.run_process(
            [*BACKFILL, *args],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


@contextlib.asynccontextmanager
async def interruptible_backfill(
    env: dict[str, str], out: Path, err: Path, *args: str
) -> AsyncIterator[trio.Process]:
    """``tradecanvas backfill ARGS`` writing to the files ``out`` and ``err``; killed on the
    way out if it is still running."""
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = await trio.lowlevel.open_process(
            [*BACKFILL, *args], env=env, stdout=stdout, stderr=stderr
        )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def counts(stdout: bytes) -> dict[str, int]:
    """The numbers of the summary's first line."""
    line = stdout.decode().splitlines()[0]
    found: dict[str, int] = {}
    for label in (
        "minutes requested",
        "fetched",
        "new",
        "already stored (unchanged)",
        "revised",
        "missing at the exchange",
    ):
        match = re.search(rf"([\d,]+) {re.escape(label)}", line)
        assert match is not None, (label, line)
        found[label] = int(match.group(1).replace(",", ""))
    return found


async def stored(db: Path, series_id: str) -> list[StoredCandle]:
    store = await CandleStore.open(db)
    try:
        return await store.range(series_id, 0, 2**40)
    finally:
        await store.aclose()


def table_dump(db: Path) -> list[tuple[object, ...]]:
    """Every candle, event and meta row of the store."""
    conn = sqlite3.connect(db)
    try:
        return [
            *conn.execute("SELECT * FROM candles ORDER BY series_id, candle_time"),
            *conn.execute("SELECT * FROM events ORDER BY rowid"),
            *conn.execute("SELECT * FROM meta ORDER BY key"),
        ]
    finally:
        conn.close()


def same_bars(got: list[StoredCandle], expected: list[Candle]) -> bool:
    return len(got) == len(expected) and all(
        g.candle.same_values(e) for g, e in zip(got, expected, strict=True)
    )


# --- the import in this process ----------------------------------------------------------


async def import_in_process(
    db: Path,
    rest_url: str,
    from_text: str,
    to_text: str | None,
    *,
    refetch: bool = False,
    **env: str,
) -> BackfillOutcome:
    """:func:`run_import` as ``run_backfill`` calls it, without the subprocess."""
    flags: RuntimeFlags = build_runtime_flags(
        {
            "TRADE_CANVAS_DB_PATH": str(db),
            "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": rest_url,
            "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m",
            **env,
        }
    ).flags
    plan = plan_backfill(BASE, from_text, to_text, time.time())
    policy = RestPolicy(max_attempts=1, weight_budget=BACKFILL_WEIGHT_BUDGET)
    with trio.fail_after(WAIT_S):
        return await run_import(
            plan, flags, policy, Progress(io.StringIO(), tty=False), refetch=refetch
        )


async def test_run_import_commits_page_after_page_and_tallies_them(tmp_path: Path) -> None:
    minutes = 3100
    rows = csv_rows("BTCUSDT-1m-2025-07-06_2025-07-12.csv")[:minutes]
    db = tmp_path / "market.sqlite3"
    config = replay_config("BTCUSDT-1m-2025-07-06_2025-07-12.csv", start_at=minutes)
    async with binance_replay(config) as replay:
        outcome = await import_in_process(db, replay.rest_url, str(WEEK), None)
        assert replay.statistics().rest_requests == 3  # one klines call per page
    assert (outcome.code, outcome.error) == (ExitCode.OK, None)
    tally = outcome.tally
    assert (tally.plan.end, tally.fetched, tally.new, tally.missing) == (
        WEEK + minutes * 60,  # capped at the replay's clock
        minutes,
        minutes,
        0,
    )
    assert tally.derived == {BASE_5M: minutes // 5}
    assert (tally.pages_fetched, tally.pages_skipped) == (3, 0)
    assert tally.elapsed_s is not None and tally.elapsed_s > 0
    assert same_bars(await stored(db, BASE), rows)


async def test_run_import_refuses_a_range_after_binance_clock(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    async with binance_replay(replay_config("BTCUSDT-1m-2023-08-16.csv", start_at=30)) as replay:
        outcome = await import_in_process(db, replay.rest_url, str(DAY + 1800), str(DAY + 3600))
        assert replay.statistics().rest_requests == 0
    assert outcome.code == ExitCode.USAGE
    assert outcome.error is not None and "is not before Binance's current minute" in outcome.error


async def test_run_import_reports_a_store_failure_and_a_rest_failure(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    db.write_bytes(b"definitely not an SQLite file " * 200)
    outcome = await import_in_process(db, UNREACHABLE, "2023-08-16", "2023-08-17")
    assert outcome.code == ExitCode.STORE_FAILURE
    assert outcome.error is not None and outcome.error.startswith("store failure: ")
    outcome = await import_in_process(tmp_path / "new.sqlite3", UNREACHABLE, "2023-08-16", None)
    assert outcome.code == ExitCode.FAILED
    assert outcome.error is not None
    assert outcome.error.startswith(f"Binance REST failed: GET {UNREACHABLE}/fapi/v1/time")
    assert outcome.error.endswith("; nothing committed")


# --- the import, by the real CLI ------------------------------------------------------------


@pytest.mark.e2e
async def test_imports_binance_bars_over_several_pages_derives_5m_and_is_idempotent(
    tmp_path: Path,
) -> None:
    minutes = 3100  # three REST pages of at most 1500 (futures)
    rows = csv_rows("BTCUSDT-1m-2025-07-06_2025-07-12.csv")[:minutes]
    rows_5m = csv_rows("BTCUSDT-5m-2025-07-06_2025-07-12.csv")[: minutes // 5]
    db = tmp_path / "market.sqlite3"
    async with binance_replay(
        replay_config("BTCUSDT-1m-2025-07-06_2025-07-12.csv", start_at=minutes)
    ) as replay:
        env = cli_env(db, replay.rest_url)
        args = (BASE, "--from", "2025-07-06", "--to", str(WEEK + minutes * 60))
        first = await run_backfill(env, *args)
        assert first.returncode == 0, first.stderr.decode()
        assert replay.statistics().rest_requests == 3  # one klines call per page
        assert counts(first.stdout) == {
            "minutes requested": minutes,
            "fetched": minutes,
            "new": minutes,
            "already stored (unchanged)": 0,
            "revised": 0,
            "missing at the exchange": 0,
        }
        assert f"{BASE_5M}: {minutes // 5} derived bars written" in first.stdout.decode()
        # not a terminal: plain progress log lines on stderr, the last one at 100%
        progress = re.findall(r"backfill \S+: (\d+)/(\d+) min \((\d+)%\)", first.stderr.decode())
        assert progress and progress[-1] == (str(minutes), str(minutes), "100")
        assert "\r" not in first.stderr.decode()

        base = await stored(db, BASE)
        assert same_bars(base, rows)
        assert {s.source for s in base} == {"rest"}
        derived = await stored(db, BASE_5M)
        assert same_bars(derived, rows_5m)  # Binance's own 5m bars, every one
        assert all(s.complete for s in derived)

        before = table_dump(db)
        second = await run_backfill(env, *args)
        assert second.returncode == 0, second.stderr.decode()
        # every page is stored whole: none is fetched again, and the run says so
        assert replay.statistics().rest_requests == 3
        assert counts(second.stdout) == {
            "minutes requested": minutes,
            "fetched": 0,
            "new": 0,
            "already stored (unchanged)": minutes,
            "revised": 0,
            "missing at the exchange": 0,
        }
        lines = second.stdout.decode().splitlines()
        assert "resumed: 3,100 minutes in 3 pages were stored already and not fetched again" in (
            lines
        )
        assert re.fullmatch(r"took \d+\.\d s, 0 REST pages", lines[-2]), lines
        assert lines[-1] == (
            "nothing changed: the store already held every candle Binance has for this range"
        )
        assert table_dump(db) == before
        # --refetch asks Binance for every page again: still nothing changes
        third = await run_backfill(env, *args, "--refetch")
        assert third.returncode == 0, third.stderr.decode()
        assert replay.statistics().rest_requests == 6
        assert counts(third.stdout)["fetched"] == minutes
        assert third.stdout.decode().splitlines()[-1].startswith("nothing changed")
        assert table_dump(db) == before


@pytest.mark.e2e
async def test_history_behind_a_live_head_gets_whole_long_derived_bars_counted_once(
    tmp_path: Path,
) -> None:
    """Importing history behind the daemon's live minutes: every bucket below the live head
    is written, so a page ending inside a 4h or 1d bucket would write it from part of its
    minutes first. Pages end on day boundaries (1440, 1440, 220 minutes, not 1500, 1500,
    100), and each bar is counted once."""
    minutes = 3100  # 2 days and 220 minutes
    all_rows = csv_rows("BTCUSDT-1m-2025-07-06_2025-07-12.csv")
    rows = all_rows[:minutes]
    db = tmp_path / "market.sqlite3"
    store = await CandleStore.open(db)
    try:
        await store.upsert(BASE, [all_rows[3 * 1440]], "ws")  # the live head, on day 4
    finally:
        await store.aclose()
    async with binance_replay(
        replay_config("BTCUSDT-1m-2025-07-06_2025-07-12.csv", start_at=3 * 1440 + 60)
    ) as replay:
        env = cli_env(db, replay.rest_url, TRADE_CANVAS_DERIVED_TIMEFRAMES="5m,4h,1d")
        done = await run_backfill(env, BASE, "--from", str(WEEK), "--to", str(WEEK + minutes * 60))
        assert done.returncode == 0, done.stderr.decode()
        assert replay.statistics().rest_requests == 3
    out = done.stdout.decode()
    assert "binance:futures:BTC/USDT:4h: 13 derived bars written" in out  # ceil(3100 / 240)
    assert "binance:futures:BTC/USDT:1d: 3 derived bars written" in out
    written = [line.split(":")[3] for line in out.splitlines() if "derived bar" in line]
    assert written == ["5m", "4h", "1d"]  # shortest first, as a chart lists them
    days = await stored(db, "binance:futures:BTC/USDT:1d")
    assert [s.complete for s in days] == [True, True, False]  # the third: 220 minutes imported
    for day in days:  # each day aggregated from exactly its own Binance minutes
        own = [
            r
            for r in rows
            if day.candle.candle_time <= r.candle_time < day.candle.candle_time + 86400
        ]
        assert (day.candle.open, day.candle.close) == (own[0].open, own[-1].close)
        assert day.candle.high == max(r.high for r in own)
        assert day.candle.low == min(r.low for r in own)
        assert day.candle.volume == sum(r.volume for r in own)


@pytest.mark.e2e
async def test_minutes_already_stored_are_kept_or_revised_to_binance_values(
    tmp_path: Path,
) -> None:
    rows = csv_rows("BTCUSDT-1m-2023-08-16.csv")[:60]
    db = tmp_path / "market.sqlite3"
    wrong = attrs.evolve(rows[7], volume=rows[7].volume + 1)  # a bad value from elsewhere
    assert not wrong.same_values(rows[7])
    store = await CandleStore.open(db)
    try:
        await store.upsert(BASE, [rows[3], wrong], "http")
    finally:
        await store.aclose()
    config = replay_config("BTCUSDT-1m-2023-08-16.csv", start_at=60)
    async with binance_replay(config) as replay:
        done = await run_backfill(
            cli_env(db, replay.rest_url), BASE, "--from", str(DAY), "--to", str(DAY + 3600)
        )
    assert done.returncode == 0, done.stderr.decode()
    assert counts(done.stdout) == {
        "minutes requested": 60,
        "fetched": 60,
        "new": 58,
        "already stored (unchanged)": 1,
        "revised": 1,
        "missing at the exchange": 0,
    }
    assert same_bars(await stored(db, BASE), rows)


async def test_exchange_holes_inside_the_history_are_stored_as_gap_events(
    tmp_path: Path,
) -> None:
    """Minutes 100..102 are missing at the exchange: a gap event, stored with the first
    candle above them; the 5m bar they leave incomplete has its own."""
    db = tmp_path / "market.sqlite3"
    config = replay_config("BTCUSDT-1m-2023-08-16.csv", start_at=1439, exchange_holes=((100, 3),))
    async with binance_replay(config) as replay:
        outcome = await import_in_process(db, replay.rest_url, str(DAY), str(DAY + 200 * 60))
    assert outcome.code == ExitCode.OK and outcome.tally.missing == 3
    store = await CandleStore.open(db)
    try:
        events = [(e.series_id, e.event, e.data["reason"]) for e in await store.events_after(0)]
        gaps = [e for e in await store.events_after(0) if e.event == "gap"]
    finally:
        await store.aclose()
    assert [(e.series_id, e.data["from_time"], e.data["to_time"]) for e in gaps] == [
        (BASE, DAY + 100 * 60, DAY + 102 * 60),
        (BASE_5M, DAY + 100 * 60, DAY + 100 * 60),
    ]
    assert (BASE_5M, "gap", "incomplete") in events


async def test_3d_is_derived_on_the_symbols_grid_learned_as_the_daemon_learns_it(
    tmp_path: Path,
) -> None:
    week = csv_rows("BTCUSDT-1m-2025-07-06_2025-07-12.csv")
    db = tmp_path / "market.sqlite3"
    config = replay_config("BTCUSDT-1m-2025-07-06_2025-07-12.csv", start_at=len(week) - 1)
    async with binance_replay(config) as replay:
        outcome = await import_in_process(
            db, replay.rest_url, str(WEEK), None, TRADE_CANVAS_DERIVED_TIMEFRAMES="1d,3d"
        )
    assert outcome.code == ExitCode.OK
    three_d = await stored(db, "binance:futures:BTC/USDT:3d")
    # futures BTCUSDT's grid opens on days mod 3 = 2: 07-07 (07-04's bucket began before
    # the history, and 07-10's lacks the minute not yet closed at the replay's clock)
    assert [(s.candle.candle_time, s.complete) for s in three_d] == [(WEEK + 86_400, True)]
    store = await CandleStore.open(db)
    try:
        assert await store.get_meta("phase:3d:futures:BTC/USDT") == str(2 * 86_400)
    finally:
        await store.aclose()


@pytest.mark.e2e
async def test_an_exchange_hole_is_reported_as_missing_minutes(tmp_path: Path) -> None:
    rows = csv_rows("BTCUSDT-1m-2023-08-16.csv")
    rows_5m = csv_rows("BTCUSDT-5m-2023-08-16.csv")
    db = tmp_path / "market.sqlite3"
    config = replay_config("BTCUSDT-1m-2023-08-16.csv", start_at=1439, exchange_holes=((100, 3),))
    async with binance_replay(config) as replay:
        done = await run_backfill(
            cli_env(db, replay.rest_url),
            BASE,
            "--from",
            "2023-08-16T00:00Z",
            "--to",
            "2023-08-16T03:20",  # minute 200
        )
    assert done.returncode == 0, done.stderr.decode()
    assert counts(done.stdout) == {
        "minutes requested": 200,
        "fetched": 197,
        "new": 197,
        "already stored (unchanged)": 0,
        "revised": 0,
        "missing at the exchange": 3,
    }
    assert (
        "holes at the exchange (1 new gap events): 2023-08-16T01:40Z..2023-08-16T01:42Z (3)"
        in done.stdout.decode().splitlines()
    )
    assert same_bars(await stored(db, BASE), rows[:100] + rows[103:200])
    derived = await stored(db, BASE_5M)
    assert [s.candle.candle_time for s in derived] == [DAY + 300 * i for i in range(40)]
    # the bucket with the hole is built from the minutes present and marked incomplete
    assert [i for i, s in enumerate(derived) if not s.complete] == [20]
    pairs = list(zip(derived, rows_5m[:40], strict=True))
    assert all(s.candle.same_values(e) for i, (s, e) in enumerate(pairs) if i != 20)


@pytest.mark.e2e
async def test_a_range_past_binance_clock_ends_at_its_current_minute(tmp_path: Path) -> None:
    """``--to`` defaults to now; Binance's ``/time`` (here the replay's clock) caps it, so
    the forming minute is never requested."""
    db = tmp_path / "market.sqlite3"
    async with binance_replay(replay_config("BTCUSDT-1m-2023-08-16.csv", start_at=30)) as replay:
        done = await run_backfill(cli_env(db, replay.rest_url), BASE, "--from", str(DAY))
    assert done.returncode == 0, done.stderr.decode()
    assert counts(done.stdout)["minutes requested"] == 30
    assert counts(done.stdout)["missing at the exchange"] == 0
    assert "Binance's clock is at 2023-08-16T00:30Z" in done.stderr.decode()
    assert [s.candle.candle_time for s in await stored(db, BASE)] == [
        DAY + 60 * i for i in range(30)
    ]


@pytest.mark.e2e
async def test_a_range_wholly_after_binance_clock_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    async with binance_replay(replay_config("BTCUSDT-1m-2023-08-16.csv", start_at=30)) as replay:
        done = await run_backfill(
            cli_env(db, replay.rest_url), BASE, "--from", str(DAY + 1800), "--to", str(DAY + 3600)
        )
        assert replay.statistics().rest_requests == 0
    assert done.returncode == 2
    assert done.stderr.decode().splitlines()[-1] == (
        "tradecanvas backfill: --from: 2023-08-16T00:30Z is not before Binance's current minute"
        " (its /time); nothing to import"
    )
    assert await stored(db, BASE) == []


# --- bad input changes nothing --------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("args", "extra_env", "expected"),
    [
        pytest.param(
            [BASE, "--from", "2023-08-16T00:00:30Z", "--to", "2023-08-16T01:00Z"],
            {},
            "tradecanvas backfill: --from: '2023-08-16T00:00:30Z' is not on a minute boundary",
            id="unaligned-from",
        ),
        pytest.param(
            [BASE, "--from", str(DAY), "--to", str(DAY + 90)],
            {},
            "tradecanvas backfill: --to: ",
            id="unaligned-to",
        ),
        pytest.param(
            [BASE, "--from", "2023-08-16T01:00Z", "--to", "2023-08-16T01:00Z"],
            {},
            "tradecanvas backfill: --from: 2023-08-16T01:00Z is not before --to",
            id="from-not-before-to",
        ),
        pytest.param(
            [BASE_5M, "--from", "2023-08-16", "--to", "2023-08-17"],
            {},
            "tradecanvas backfill: SERIES: binance:futures:BTC/USDT:5m is not a base series",
            id="derived-series",
        ),
        pytest.param(
            ["binance:futures:BTCUSDT:1m", "--from", "2023-08-16"],
            {},
            "tradecanvas backfill: SERIES: bad series_id",
            id="malformed-series",
        ),
        pytest.param(
            [BASE, "--from", "last tuesday"],
            {},
            "tradecanvas backfill: --from: 'last tuesday' is not a time",
            id="garbage-time",
        ),
        pytest.param(
            [BASE, "--from", str(DAY * 1000)],
            {},
            "tradecanvas backfill: --from: '1692144000000' looks like milliseconds",
            id="milliseconds",
        ),
        pytest.param(
            [BASE, "--from", "2023-08-16"],
            {"TRADE_CANVAS_BINANCE_FUTURES_REST_URL": "ftp://example"},
            "tradecanvas: TRADE_CANVAS_BINANCE_FUTURES_REST_URL: ",
            id="bad-flag-variable",
        ),
        pytest.param(
            [BASE, "--from", "2023-08-16", "--derived-timeframes", "7m"],
            {},
            "tradecanvas: --derived-timeframes (over TRADE_CANVAS_DERIVED_TIMEFRAMES): ",
            id="bad-flag-option",
        ),
        pytest.param(
            [BASE, "--to", "2023-08-16"],
            {},
            "the following arguments are required: --from",
            id="no-from",
        ),
    ],
)
@pytest.mark.parametrize("store_exists", [False, True])
async def test_bad_arguments_exit_2_and_leave_the_store_alone(
    tmp_path: Path, args: list[str], extra_env: dict[str, str], expected: str, store_exists: bool
) -> None:
    db = tmp_path / "market.sqlite3"
    if store_exists:
        db.write_bytes(b"whatever is here is not touched " * 64)
    done = await run_backfill(cli_env(db, UNREACHABLE, **extra_env), *args)
    assert done.returncode == 2
    assert expected in done.stderr.decode(), done.stderr.decode()
    assert done.stdout == b""
    if store_exists:
        assert db.read_bytes() == b"whatever is here is not touched " * 64
    else:
        assert not db.exists()
    left = sorted(p.name for p in await trio.Path(tmp_path).iterdir())
    assert left == ["market.sqlite3"] * store_exists  # no -wal, -shm or journal either


# --- failures ----------------------------------------------------------------------------


@pytest.mark.e2e
async def test_unreachable_rest_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    done = await run_backfill(
        cli_env(db, UNREACHABLE),
        BASE,
        "--from",
        "2023-08-16",
        "--to",
        "2023-08-17",
        "--attempts",
        "1",
    )
    assert done.returncode == 1
    last = done.stderr.decode().splitlines()[-1]
    assert last.startswith(
        f"tradecanvas backfill: Binance REST failed: GET {UNREACHABLE}/fapi/v1/time"
    ), last
    assert "nothing committed" in last
    assert "0 fetched" in done.stdout.decode()
    assert await stored(db, BASE) == []


@pytest.mark.e2e
async def test_a_stored_ban_is_honoured_without_calling_binance(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    store = await CandleStore.open(db)
    await StoreBanMemory(store).save("futures", time.time() + 3600)  # a 418 of an earlier run
    await store.aclose()
    async with binance_replay(replay_config("BTCUSDT-1m-2023-08-16.csv", start_at=60)) as replay:
        done = await run_backfill(
            cli_env(db, replay.rest_url), BASE, "--from", str(DAY), "--to", str(DAY + 3600)
        )
        assert replay.statistics().rest_requests == 0
    assert done.returncode == 1
    assert "stay away" in done.stderr.decode().splitlines()[-1]
    assert await stored(db, BASE) == []


@pytest.mark.e2e
async def test_a_store_failure_exits_3_like_serve(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    db.write_bytes(b"definitely not an SQLite file " * 200)
    done = await run_backfill(cli_env(db, UNREACHABLE), BASE, "--from", "2023-08-16")
    assert done.returncode == ExitCode.STORE_FAILURE
    assert "tradecanvas backfill: store failure: " in done.stderr.decode()
    assert db.read_bytes().startswith(b"definitely not")


@pytest.mark.e2e
async def test_ctrl_c_stops_cleanly_with_exit_130(tmp_path: Path) -> None:
    """A Binance that accepts the connection and never answers: Ctrl-C drops the request in
    flight, closes the store and exits 130, saying what was committed."""
    db = tmp_path / "market.sqlite3"
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    env = cli_env(db, f"http://127.0.0.1:{port}")
    args = (BASE, "--from", "2023-08-16", "--to", "2023-08-17")
    async with interruptible_backfill(env, out, err, *args) as proc:
        with trio.fail_after(WAIT_S):
            connection = await listener.accept()  # the first request is on its way
            proc.send_signal(signal.SIGINT)
            assert await proc.wait() == 130
    await connection.aclose()
    await listener.aclose()
    lines = err.read_text().splitlines()
    assert "SIGINT: stopping after the page in flight" in err.read_text()
    assert lines[-1] == "tradecanvas backfill: interrupted; nothing committed"
    assert "0 done" in out.read_text()
    assert await stored(db, BASE) == []


async def _stalling_proxy(
    target_port: int,
    stall_at: int,
    stalled: trio.Event,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """A TCP relay to the replay that holds the ``stall_at``-th klines request forever: a
    Binance that stops answering in the middle of an import."""

    async def relay(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", target_port) as upstream:

            async def client_to_upstream() -> None:
                seen = 0
                async for data in client:
                    seen += data.count(b"GET /fapi/v1/klines")
                    if seen >= stall_at:
                        stalled.set()
                        await trio.sleep_forever()
                    await upstream.send_all(data)

            async def upstream_to_client() -> None:
                async for data in upstream:
                    await client.send_all(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(client_to_upstream)
                nursery.start_soon(upstream_to_client)

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(relay, listeners)


@pytest.mark.e2e
async def test_ctrl_c_in_the_middle_keeps_the_pages_committed_and_a_rerun_resumes(
    tmp_path: Path,
) -> None:
    rows = csv_rows("BTCUSDT-1m-2025-07-06_2025-07-12.csv")
    rows_5m = csv_rows("BTCUSDT-5m-2025-07-06_2025-07-12.csv")
    db = tmp_path / "market.sqlite3"
    out, err = tmp_path / "stdout", tmp_path / "stderr"
    stalled = trio.Event()
    config = replay_config("BTCUSDT-1m-2025-07-06_2025-07-12.csv", start_at=4000)
    async with binance_replay(config) as replay, trio.open_nursery() as nursery:
        replay_port = int(replay.rest_url.rsplit(":", 1)[1])
        port = await nursery.start(_stalling_proxy, replay_port, 2, stalled)
        env = cli_env(db, f"http://127.0.0.1:{port}")
        args = (BASE, "--from", str(WEEK), "--to", str(WEEK + 4000 * 60))
        async with interruptible_backfill(env, out, err, *args) as proc:
            with trio.fail_after(WAIT_S):
                await stalled.wait()  # page 1 is committed, page 2 hangs at "Binance"
                proc.send_signal(signal.SIGINT)
                assert await proc.wait() == 130
        # the same command again (Binance answering now): it continues where it stopped
        again = await run_backfill(
            cli_env(db, replay.rest_url), BASE, "--from", str(WEEK), "--to", str(WEEK + 4000 * 60)
        )
        assert again.returncode == 0, again.stderr.decode()
        assert replay.statistics().rest_requests == 1 + 2  # page 1 before; pages 2 and 3 now
        nursery.cancel_scope.cancel()
    assert "resumed: 1,500 minutes in 1 pages were stored already and not fetched again" in (
        again.stdout.decode().splitlines()
    )
    assert counts(again.stdout)["new"] == 2500
    assert same_bars(await stored(db, BASE), rows[:4000])
    assert same_bars(await stored(db, BASE_5M), rows_5m[:800])
    assert err.read_text().splitlines()[-1] == (
        "tradecanvas backfill: interrupted; committed up to 2025-07-07T01:00Z (from"
        " 2025-07-06T00:00Z); that stays stored, run the same command again to finish"
    )
    assert "4,000 minutes requested, 1,500 done, 1,500 fetched, 1,500 new" in out.read_text()


@pytest.mark.e2e
async def test_on_a_terminal_the_progress_is_one_line_rewritten(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    parent, child = os.openpty()
    received: list[bytes] = []

    def read_terminal() -> None:
        while True:
            try:
                data = os.read(parent, 4096)
            except OSError:  # EIO: every writer has closed the terminal
                return
            if not data:
                return
            received.append(data)

    config = replay_config("BTCUSDT-1m-2025-07-06_2025-07-12.csv", start_at=3100)
    try:
        async with binance_replay(config) as replay, trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(trio.to_thread.run_sync, read_terminal))
            try:
                with trio.fail_after(WAIT_S):
                    done = await trio.run_process(
                        [
                            *BACKFILL,
                            BASE,
                            "--from",
                            str(WEEK),
                            "--to",
                            str(WEEK + 186000),
                        ],
                        env=cli_env(db, replay.rest_url),
                        stderr=child,
                        capture_stdout=True,
                        check=False,
                    )
            finally:
                os.close(child)  # the reader sees EIO once the child's copy is gone too
    finally:
        os.close(parent)
    assert done.returncode == 0
    terminal = b"".join(received).decode()
    # the shared rich bar (tradecanvas.tools.progress), redrawn after each page
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", terminal)
    for count in ("48% 1,500/3,100 min", "97% 3,000/3,100 min", "100% 3,100/3,100 min"):
        assert f"{BASE} " in shown and count in shown
    assert "3,100 new" in done.stdout.decode()  # the summary still goes to stdout


def test_backfill_takes_its_own_flags_as_options_not_serves() -> None:
    """Its store, the REST base URLs, the series and logging; not serve's listeners, limits
    or bus (they did nothing, and its --help listed 30 of them)."""
    parser = build_parser()
    args = parser.parse_args(
        ["backfill", BASE, "--from", "2025-07-06", "--db-path", "m.sqlite3",
         "--binance-futures-rest-url", "http://127.0.0.1:1", "--log-format", "json"]
    )  # fmt: skip
    assert (args.flag_db_path, args.flag_log_format) == ("m.sqlite3", "json")
    for serve_only in ("--ws-port", "--max-connections", "--redis-url", "--role"):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            parser.parse_args(["backfill", BASE, "--from", "2025-07-06", serve_only, "1"])


@pytest.mark.e2e
async def test_a_backfill_derives_what_the_store_records_unless_told_to_rebuild(
    tmp_path: Path,
) -> None:
    """As import does (tools/importer/settings.py): a backfill run without the daemon's
    TRADE_CANVAS_DERIVED_TIMEFRAMES derives what the store records (it rebuilt every
    derived bar of the whole history under its own set, factor.rebuild to every
    subscriber, and the daemon rebuilt them back at its next start); a different set given
    is refused (exit 2), unless --rebuild-derived."""
    db = tmp_path / "market.sqlite3"

    def fingerprints() -> tuple[list[tuple[object, ...]], int]:
        with sqlite3.connect(db) as conn:
            meta = list(
                conn.execute("SELECT value FROM meta WHERE key = ?", (f"fingerprint:{BASE}",))
            )
            rebuilt = conn.execute(
                'SELECT COUNT(*) FROM events WHERE data LIKE \'%"reason":"fingerprint"%\''
            ).fetchone()[0]
        return meta, int(rebuilt)

    async with binance_replay(
        replay_config("BTCUSDT-1m-2025-07-06_2025-07-12.csv", start_at=600)
    ) as replay:
        daemon = cli_env(db, replay.rest_url, TRADE_CANVAS_DERIVED_TIMEFRAMES="5m,1h")
        first = await run_backfill(daemon, BASE, "--from", "2025-07-06", "--to", str(WEEK + 300))
        assert first.returncode == 0, first.stderr.decode()
        recorded = fingerprints()
        assert recorded == ([("binance-exact-v1;derived=5m,1h",)], 0)

        forgot = cli_env(db, replay.rest_url)
        del forgot["TRADE_CANVAS_DERIVED_TIMEFRAMES"]  # the default set, not given
        args = (BASE, "--from", str(WEEK + 300), "--to", str(WEEK + 600))
        second = await run_backfill(forgot, *args)
        assert second.returncode == 0, second.stderr.decode()
        assert "backfill: deriving 5m,1h as the store records" in second.stderr.decode()
        assert fingerprints() == recorded

        other = cli_env(db, replay.rest_url, TRADE_CANVAS_DERIVED_TIMEFRAMES="5m")
        before = table_dump(db)
        refused = await run_backfill(
            other, BASE, "--from", str(WEEK + 600), "--to", str(WEEK + 900)
        )
        assert refused.returncode == ExitCode.USAGE, refused.stderr.decode()
        said = refused.stderr.decode()
        assert "the store records other derived timeframes than this backfill's 5m" in said
        assert f"{BASE}: 5m,1h" in said and "--rebuild-derived" in said
        assert table_dump(db) == before

        rebuilt = await run_backfill(
            other, BASE, "--from", str(WEEK + 600), "--to", str(WEEK + 900), "--rebuild-derived"
        )
        assert rebuilt.returncode == 0, rebuilt.stderr.decode()
        meta, events = fingerprints()
        assert meta == [("binance-exact-v1;derived=5m",)] and events >= 1
