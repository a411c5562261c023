"""The real ``tradecanvas import`` as an operator runs it beside a daemon's store: the store's
derivation settings kept, refusals named with their exit codes, the summary of a partial run."""

from __future__ import annotations

import io
import logging
import shutil
import sqlite3
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import trio

from tests.cli_rig import cli_env
from tests.tools.importer.rig import SPOT_1M, dump_dir, plan, real_zips, rows
from tradecanvas.errors import ExitCode
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.tools.importer import ImportTally, run_import
from tradecanvas.tools.progress import Progress

WAIT_S = 120
DAEMON = "5m,15m,1h,4h,1d,1w"
DAEMON_FP = f"binance-exact-v1;derived={DAEMON}"


async def tradecanvas(db: Path, *args: str, **env: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT_S):
        return await trio.run_process(
            [sys.executable, "-m", "tradecanvas", *args],
            env=cli_env(TRADE_CANVAS_DB_PATH=str(db), **env),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def query(db: Path, sql: str, *params: str) -> list[tuple[object, ...]]:
    with sqlite3.connect(db) as conn:
        return list(conn.execute(sql, params))


def fingerprint_events(db: Path) -> int:
    return len(query(db, 'SELECT 1 FROM events WHERE data LIKE \'%"reason":"fingerprint"%\''))


def fingerprint_of(db: Path, series: str) -> object:
    found = query(db, "SELECT value FROM meta WHERE key = ?", f"fingerprint:{series}")
    return found[0][0] if found else None


@pytest.mark.e2e
async def test_an_import_without_the_daemons_derived_timeframes_derives_the_stores(
    tmp_path: Path,
) -> None:
    """The store was filled with the daemon's TRADE_CANVAS_DERIVED_TIMEFRAMES (1w added); an
    import run without it derives what the store records: no whole-history factor.rebuild
    (reason fingerprint), the fingerprint left as the daemon wrote it (review D2)."""
    db = tmp_path / "m.sqlite3"
    zips = [str(p) for p in real_zips()]
    daemon = await tradecanvas(db, "import", *zips[:2], TRADE_CANVAS_DERIVED_TIMEFRAMES=DAEMON)
    assert daemon.returncode == 0, daemon.stderr.decode()
    assert fingerprint_of(db, SPOT_1M) == DAEMON_FP

    forgot = await tradecanvas(db, "import", zips[2])
    assert forgot.returncode == 0, forgot.stderr.decode()
    assert fingerprint_events(db) == 0
    assert fingerprint_of(db, SPOT_1M) == DAEMON_FP
    assert "deriving 5m,15m,1h,4h,1d,1w as the store records" in forgot.stderr.decode()
    # a series new to the store takes what the store's other series record
    eth = "binance:spot:ETH/USDT:1m"
    other = await tradecanvas(db, "import", "--series", eth, zips[0])
    assert other.returncode == 0, other.stderr.decode()
    assert fingerprint_of(db, eth) == DAEMON_FP
    assert "deriving 5m,15m,1h,4h,1d,1w, as the store's other series" in other.stderr.decode()

    # given explicitly and different: refused, naming both, nothing changed
    candles = query(db, "SELECT COUNT(*) FROM candles")
    for given in ({"TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m"}, {}):
        options = () if given else ("--derived-timeframes", "5m,15m")
        refused = await tradecanvas(db, "import", *options, zips[2], **given)
        assert refused.returncode == ExitCode.USAGE, refused.stderr.decode()
        err = refused.stderr.decode()
        assert "the store records other derived timeframes" in err
        assert f"{SPOT_1M}: {DAEMON}" in err and "--rebuild-derived" in err
        assert fingerprint_events(db) == 0 and fingerprint_of(db, SPOT_1M) == DAEMON_FP
    assert query(db, "SELECT COUNT(*) FROM candles") == candles

    # and asked for: rebuilt under the import's timeframes
    rebuilt = await tradecanvas(
        db, "import", "--derived-timeframes", "5m", "--rebuild-derived", zips[2]
    )
    assert rebuilt.returncode == 0, rebuilt.stderr.decode()
    assert fingerprint_events(db) >= 1
    assert fingerprint_of(db, SPOT_1M) == "binance-exact-v1;derived=5m"


@pytest.mark.e2e
async def test_a_file_of_another_interval_exits_1_with_nothing_imported(tmp_path: Path) -> None:
    """As --help and docs/history.md say: a file refused exits 1 (it exited 2, usage);
    found while planning, before any file is read: nothing imported (review D3)."""
    folder = tmp_path / "spot"
    folder.mkdir()
    for day in real_zips()[:2]:
        shutil.copyfile(day, folder / day.name)
    with zipfile.ZipFile(folder / "BTCUSDT-5m-2020-01-03.zip", "w") as z:
        z.writestr("BTCUSDT-5m-2020-01-03.csv", "")
    db = tmp_path / "m.sqlite3"
    done = await tradecanvas(db, "import", str(folder))
    assert done.returncode == ExitCode.FAILED, done.stderr.decode()
    assert "BTCUSDT-5m-2020-01-03.zip: holds 5m klines" in done.stderr.decode()
    assert "nothing imported" in done.stderr.decode()
    assert not db.exists()
    helped = await tradecanvas(db, "import", "--help")
    assert "1  a file refused" in " ".join(helped.stdout.decode().split()) or (
        "a file of another interval" in helped.stdout.decode()
    )


@pytest.mark.e2e
async def test_a_market_the_path_contradicts_is_refused(tmp_path: Path) -> None:
    """``--market`` against the market the path names (a …/spot/… folder, a …/um/… one) is
    refused, exit 2, nothing stored: it silently won (review D4)."""
    db = tmp_path / "m.sqlite3"
    spot = await tradecanvas(db, "import", "--market", "futures", str(dump_dir()))
    assert spot.returncode == ExitCode.USAGE
    assert "--market futures contradicts the path, which names spot" in spot.stderr.decode()
    um = tmp_path / "data" / "futures" / "um" / "daily"
    um.mkdir(parents=True)
    shutil.copyfile(real_zips()[0], um / real_zips()[0].name)
    fut = await tradecanvas(db, "import", "--market", "spot", str(um))
    assert fut.returncode == ExitCode.USAGE
    assert "--market spot contradicts the path, which names futures" in fut.stderr.decode()
    assert not db.exists()
    # the same market as the path, or a path that names none, is taken
    plain = tmp_path / "plain"
    plain.mkdir()
    shutil.copyfile(real_zips()[0], plain / real_zips()[0].name)
    agreed = await tradecanvas(db, "import", "--market", "futures", str(um), str(plain))
    assert agreed.returncode == 0, agreed.stderr.decode()
    assert query(db, "SELECT DISTINCT series_id FROM candles WHERE series_id LIKE '%:1m'") == [
        ("binance:futures:BTC/USDT:1m",)
    ]


@pytest.mark.e2e
async def test_a_non_archive_csv_in_a_folder_is_named_with_how_to_leave_it_out(
    tmp_path: Path,
) -> None:
    """A folder holding the joined CSV ``fetch-archive --csv`` wrote: refused whole (exit 2),
    naming that file and how to leave it out (review D7)."""
    folder = tmp_path / "spot"
    folder.mkdir()
    shutil.copyfile(real_zips()[0], folder / real_zips()[0].name)
    joined = folder / "btc-2020.csv"
    joined.write_text("")
    db = tmp_path / "m.sqlite3"
    done = await tradecanvas(db, "import", str(folder))
    assert done.returncode == ExitCode.USAGE
    err = done.stderr.decode()
    assert f"{joined}: found in a folder given" in err
    assert "move it out of the folder, or name the archive files" in err
    assert not db.exists()


@pytest.mark.e2e
async def test_days_missing_at_a_monthly_files_end_are_told_as_a_file_cut_short(
    tmp_path: Path,
) -> None:
    """A monthly file whose rows stop on the 3rd: the 28 days after are likelier a cut file
    than Binance's hole, and the summary says so (they were "holes at Binance")."""
    month = tmp_path / "spot" / "BTCUSDT-1m-2020-01.csv"
    month.parent.mkdir()
    month.write_text(
        "".join((dump_dir() / f"BTCUSDT-1m-2020-01-0{d}.csv").read_text() for d in (1, 2, 3))
    )
    db = tmp_path / "m.sqlite3"
    done = await tradecanvas(db, "import", str(month))
    assert done.returncode == 0, done.stderr.decode()
    out = done.stdout.decode()
    assert (
        f"{SPOT_1M}: 40,320 minutes missing after a file's last row to its period's end"
        " (a file cut short? check it, fetch it again): 2020-01-04T00:00Z..2020-01-31T23:59Z"
    ) in out
    assert "holes at Binance" not in out


def test_the_summary_of_an_interrupted_run_tells_the_part_of_a_file() -> None:
    """Interrupted inside a file: its committed candles are not credited to the files
    imported (review D5: "129,600 candles from 2 files" where 41,760 were the third's)."""
    tally = ImportTally(files_total=4)
    tally.record_commit(SPOT_1M, 129_600, [])
    for _ in range(2):
        tally.record_file(SPOT_1M, verified=True, holes=[], candles=43_920)
    lines = tally.summary_lines(1.0)
    assert lines[0] == (
        f"{SPOT_1M}: 129,600 candles: 87,840 from 2 files (2 checksums verified) and 41,760"
        " of the next file, committed in part: 0 new, 129,600 unchanged, 0 revised"
    )
    assert lines[-1].startswith("2 of 4 files imported")


async def test_a_refused_file_leaves_the_bars_finished_at_what_was_committed(
    tmp_path: Path,
) -> None:
    """On a terminal, a refused file ended the run with every bar at its planned total
    unreached (review D6): the bars end at what was committed."""
    folder = tmp_path / "spot"
    folder.mkdir()
    good, bad = real_zips()[:2]
    shutil.copyfile(good, folder / good.name)
    shutil.copyfile(bad, folder / bad.name)
    (folder / (bad.name + ".CHECKSUM")).write_text("f" * 64 + f"  {bad.name}\n")
    db = tmp_path / "m.sqlite3"
    screen = io.StringIO()
    progress = Progress(screen, log=logging.getLogger("test"), verb="import", tty=True)
    flags = build_runtime_flags({}).flags
    code, _, _ = await run_import(
        plan([folder]), db, flags.derived_timeframes, flags.derivation_fingerprint(), progress
    )
    assert code == ExitCode.FAILED
    assert len(await rows(db, SPOT_1M)) == 1440
    last = screen.getvalue().rsplit(SPOT_1M, 1)[1]  # the bar as it was left
    assert "1,440/1,440 candles" in last and "100%" in last
