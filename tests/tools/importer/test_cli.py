"""The real ``tradecanvas import`` and ``export`` in subprocesses: summary, exit codes."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from tests.cli_rig import cli_env
from tests.tools.importer.rig import DAYS, SPOT_1M, dump_dir, real_zips
from tradecanvas.errors import ExitCode
from tradecanvas.wire.archive import parse_archive_rows

WAIT_S = 120


async def tradecanvas(db: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    with trio.fail_after(WAIT_S):
        return await trio.run_process(
            [sys.executable, "-m", "tradecanvas", *args],
            env=cli_env(TRADE_CANVAS_DB_PATH=str(db)),
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )


def counts(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        return dict(conn.execute("SELECT series_id, COUNT(*) FROM candles GROUP BY 1"))


@pytest.mark.e2e
async def test_import_of_the_three_zips_stores_them_once_and_says_so(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    first = await tradecanvas(db, "import", *map(str, real_zips()))
    assert first.returncode == 0, first.stderr.decode()
    out = first.stdout.decode()
    assert (
        f"{SPOT_1M}: 4,320 candles from 3 files (3 checksums verified): 4,320 new, 0 unchanged,"
        " 0 revised"
    ) in out
    assert "binance:spot:BTC/USDT:5m: 864 new, 0 revised (derived)" in out
    assert counts(db)[SPOT_1M] == 4320 and counts(db)["binance:spot:BTC/USDT:5m"] == 864
    # not a terminal: plain progress lines, the last at 100%
    assert "import binance:spot:BTC/USDT:1m: 4320/4320 candles (100%)" in first.stderr.decode()
    assert "\r" not in first.stderr.decode()

    again = await tradecanvas(db, "import", str(dump_dir()))
    assert again.returncode == 0
    assert "nothing changed: every candle was already stored" in again.stdout.decode()
    assert counts(db)[SPOT_1M] == 4320

    # export gives back the archive's own rows
    exported = tmp_path / "out.csv"
    done = await tradecanvas(
        db, "export", SPOT_1M, "--from", "2020-01-01", "--to", "2020-01-04", "--out", str(exported)
    )
    assert done.returncode == 0, done.stderr.decode()
    assert "4,320 candles" in done.stderr.decode()
    original = [
        c
        for day in DAYS
        for c in parse_archive_rows((dump_dir() / f"BTCUSDT-1m-{day}.csv").read_text().splitlines())
    ]
    assert parse_archive_rows(exported.read_text().splitlines()) == original


@pytest.mark.e2e
async def test_a_bad_checksum_exits_1_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "spot"
    folder.mkdir()
    zip_path = folder / "BTCUSDT-1m-2020-01-01.zip"
    shutil.copyfile(real_zips()[0], zip_path)
    (folder / (zip_path.name + ".CHECKSUM")).write_text("f" * 64 + f"  {zip_path.name}\n")
    db = tmp_path / "m.sqlite3"
    done = await tradecanvas(db, "import", str(folder))
    assert done.returncode == ExitCode.FAILED
    assert f"tradecanvas import: {zip_path}: SHA-256 " in done.stderr.decode()
    assert counts(db) == {}
    # the summary does not claim the refused file's candles were stored already
    assert "already stored" not in done.stdout.decode()
    assert "nothing changed in the store" in done.stdout.decode()


@pytest.mark.e2e
async def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    missing = await tradecanvas(db, "import", str(tmp_path / "nope.zip"))
    assert missing.returncode == ExitCode.USAGE
    assert "no such file or folder" in missing.stderr.decode()
    odd = tmp_path / "data.csv"
    odd.write_text("")
    unnamed = await tradecanvas(db, "import", str(odd))
    assert unnamed.returncode == ExitCode.USAGE and "--series" in unnamed.stderr.decode()
    derived = await tradecanvas(db, "import", "--series", "binance:spot:BTC/USDT:5m", str(odd))
    assert derived.returncode == ExitCode.USAGE
    backwards = await tradecanvas(
        db, "export", SPOT_1M, "--from", "2020-01-02", "--to", "2020-01-01"
    )
    assert backwards.returncode == ExitCode.USAGE


@pytest.mark.e2e
async def test_export_that_fails_leaves_the_output_file_and_the_store_path_alone(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.sqlite3"
    assert (await tradecanvas(db, "import", *map(str, real_zips()))).returncode == 0
    kept = tmp_path / "kept.csv"
    kept.write_text("an earlier export\n")
    kept.chmod(0o640)
    span = ("--from", "2020-01-01", "--to", "2020-01-04", "--out", str(kept))

    # a mistyped store path: refused, and no empty store made there
    typo = tmp_path / "typo.sqlite3"
    missing = await tradecanvas(typo, "export", SPOT_1M, *span)
    assert missing.returncode == ExitCode.STORE_FAILURE
    assert f"no candle store at {typo}" in missing.stderr.decode()
    assert not typo.exists()

    # a store that fails to open
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"not a database" * 100)
    failed = await tradecanvas(corrupt, "export", SPOT_1M, *span)
    assert failed.returncode == ExitCode.STORE_FAILURE

    # a series the store holds nothing of (a timeframe it does not derive, a typo)
    for unknown in ("binance:spot:BTC/USDT:7m", "binance:spot:ETH/USDT:1m"):
        refused = await tradecanvas(db, "export", unknown, *span)
        assert refused.returncode == ExitCode.USAGE
        assert f"the store holds no candle of {unknown}" in refused.stderr.decode()

    assert kept.read_text() == "an earlier export\n"
    assert kept.stat().st_mode & 0o777 == 0o640
    assert not list(tmp_path.glob(".kept*"))  # noqa: ASYNC240 (the test's own folder)

    # a good export replaces it, keeping its mode
    done = await tradecanvas(db, "export", SPOT_1M, *span)
    assert done.returncode == 0, done.stderr.decode()
    assert len(kept.read_text().splitlines()) == 4320
    assert kept.stat().st_mode & 0o777 == 0o640
