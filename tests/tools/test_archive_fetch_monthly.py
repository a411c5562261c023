"""``tradecanvas fetch-archive`` with Binance's monthly zips: a month's zip for each whole
month of the range and the days' zips for the rest, spot and USDⓈ-M layouts, checksums
verified; a month not in the archive (yet) is fetched as its days. The same local HTTP server
as ``test_archive_fetch.py``; the months are made here from the shared days' rows."""

from __future__ import annotations

import hashlib
import io
import zipfile
from datetime import date, timedelta
from pathlib import Path

import pytest
import trio

from tests.tools.test_archive_fetch import (
    DAYS,
    NO_WAIT,
    PREFIX,
    WAIT_S,
    archive_root,
    archive_server,
    run_fetch,
    shared_spot,
)
from tradecanvas.errors import ExitCode
from tradecanvas.tools.archive_fetch import Fetched, fetch_days, write_joined_csv
from tradecanvas.tools.archive_layout import ArchiveDay, ArchiveError, archive_files, verify_zip

UM_MONTHLY = "data/futures/um/monthly/klines/BTCUSDT/1m"
SPOT_MONTHLY = "data/spot/monthly/klines/BTCUSDT/1m"


def put_zip(folder: Path, name: str, csv_text: str) -> None:
    """A zip holding one CSV, and its ``.CHECKSUM`` as Binance writes it."""
    folder.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name.removesuffix(".zip") + ".csv", csv_text)
    data = buffer.getvalue()
    (folder / name).write_bytes(data)
    (folder / (name + ".CHECKSUM")).write_text(f"{hashlib.sha256(data).hexdigest()}  {name}\n")


def month_rows(first: date) -> str:
    """The shared days' rows moved to ``first`` (a stand-in month: only bytes matter here)."""
    shift_ms = int((first - date(2020, 1, 1)).total_seconds()) * 1000
    rows = []
    for day in DAYS:
        with zipfile.ZipFile(shared_spot() / f"BTCUSDT-1m-{day}.zip") as archive:
            text = archive.read(archive.namelist()[0]).decode()
        for line in text.splitlines():
            fields = line.split(",")
            fields[0] = str(int(fields[0]) + shift_ms)
            fields[6] = str(int(fields[6]) + shift_ms)
            rows.append(",".join(fields))
    return "\n".join(rows) + "\n"


async def fetch(base: str, out: Path, files: list[ArchiveDay]) -> tuple[str, list[Fetched]]:
    report = io.StringIO()
    with trio.fail_after(WAIT_S):
        fetched = await fetch_days(files, out, base_url=base, policy=NO_WAIT, report=report)
    return report.getvalue(), fetched


def names(files: list[ArchiveDay]) -> list[str]:
    return [f.name for f in files]


# --- the plan ------------------------------------------------------------------------------


def test_whole_months_are_monthly_files_and_the_rest_days() -> None:
    files = archive_files("spot", "BTCUSDT", "1m", date(2019, 12, 30), date(2020, 3, 2))
    assert names(files) == [
        "BTCUSDT-1m-2019-12-30.zip",
        "BTCUSDT-1m-2019-12-31.zip",
        "BTCUSDT-1m-2020-01.zip",
        "BTCUSDT-1m-2020-02.zip",
        "BTCUSDT-1m-2020-03-01.zip",
        "BTCUSDT-1m-2020-03-02.zip",
    ]
    assert sum(len(f.days) for f in files) == 2 + 31 + 29 + 2  # 2020 is a leap year
    # a month cut at either end is days only
    part = archive_files("spot", "BTCUSDT", "1m", date(2020, 1, 2), date(2020, 1, 31))
    assert {f.period for f in part} == {"daily"} and len(part) == 30
    assert names(archive_files("spot", "BTCUSDT", "1m", date(2020, 2, 1), date(2020, 2, 29))) == [
        "BTCUSDT-1m-2020-02.zip"
    ]


def test_monthly_urls_follow_the_archive_layout() -> None:
    (spot,) = archive_files("spot", "BTCUSDT", "1m", date(2020, 1, 1), date(2020, 1, 31))
    (um,) = archive_files("um", "BTCUSDT", "5m", date(2025, 6, 1), date(2025, 6, 30))
    assert spot.url("https://data.binance.vision") == (
        f"https://data.binance.vision/{SPOT_MONTHLY}/BTCUSDT-1m-2020-01.zip"
    )
    assert um.url("https://data.binance.vision/") == (
        "https://data.binance.vision/data/futures/um/monthly/klines/BTCUSDT/5m/"
        "BTCUSDT-5m-2025-06.zip"
    )
    assert (um.day, um.last_day) == (date(2025, 6, 1), date(2025, 6, 30))


# --- downloads from a real HTTP server -----------------------------------------------------


async def test_a_month_and_days_are_fetched_verified_and_joined(tmp_path: Path) -> None:
    root = archive_root(tmp_path)  # the shared 2020-01-01..03 days
    put_zip(root / SPOT_MONTHLY, "BTCUSDT-1m-2019-12.zip", month_rows(date(2019, 12, 1)))
    out = tmp_path / "out"
    files = archive_files("spot", "BTCUSDT", "1m", date(2019, 12, 1), date(2020, 1, 3))
    assert names(files) == ["BTCUSDT-1m-2019-12.zip", *(f"BTCUSDT-1m-{d}.zip" for d in DAYS)]
    with archive_server(root) as (base, handler):
        report, fetched = await fetch(base, out, files)
        assert handler.requests[:2] == [
            f"/{SPOT_MONTHLY}/BTCUSDT-1m-2019-12.zip.CHECKSUM",
            f"/{SPOT_MONTHLY}/BTCUSDT-1m-2019-12.zip",
        ]
        assert len(handler.requests) == 8
        handler.requests.clear()
        again, _ = await fetch(base, out, files)
        assert handler.requests == []  # all verified on disk
    assert report.count("downloaded, SHA-256 verified") == 4
    assert again.count("already present, SHA-256 verified") == 4
    month = out / "BTCUSDT-1m-2019-12.zip"
    assert month.read_bytes() == (root / SPOT_MONTHLY / month.name).read_bytes()
    verify_zip(month, out / "BTCUSDT-1m-2019-12.zip.CHECKSUM")
    joined = tmp_path / "joined.csv"
    assert write_joined_csv(fetched, joined) == 2 * 4320
    lines = joined.read_text().splitlines()
    assert lines[1].split(",")[0] == "1575158400000"  # 2019-12-01T00:00Z
    assert lines[4321].split(",")[0] == "1577836800000"  # 2020-01-01T00:00Z


async def test_a_futures_month_is_verified_and_a_bad_one_refused(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    put_zip(root / UM_MONTHLY, "BTCUSDT-1m-2025-06.zip", month_rows(date(2025, 6, 1)))
    files = archive_files("um", "BTCUSDT", "1m", date(2025, 6, 1), date(2025, 6, 30))
    with archive_server(root) as (base, _):
        report, fetched = await fetch(base, tmp_path / "good", files)
        assert [f.path.name for f in fetched] == ["BTCUSDT-1m-2025-06.zip"]
        assert "BTCUSDT-1m-2025-06.zip: downloaded, SHA-256 verified" in report
        name = "BTCUSDT-1m-2025-06.zip"
        (root / UM_MONTHLY / (name + ".CHECKSUM")).write_text(f"{'0' * 64}  {name}\n")
        with pytest.raises(ArchiveError) as refused:
            await fetch(base, tmp_path / "bad", files)
    message = str(refused.value)
    assert message.startswith(f"{base}/{UM_MONTHLY}/{name}: SHA-256 "), message
    assert message.endswith("nothing kept")
    assert list((tmp_path / "bad").iterdir()) == []


async def test_a_month_not_in_the_archive_is_fetched_as_its_days(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    first = date(2019, 2, 1)
    for i in range(28):
        day = first + timedelta(days=i)
        put_zip(root / PREFIX, f"BTCUSDT-1m-{day}.zip", f"{i}\n")
    files = archive_files("spot", "BTCUSDT", "1m", first, date(2019, 2, 28))
    assert names(files) == ["BTCUSDT-1m-2019-02.zip"]
    with archive_server(root) as (base, handler):
        report, fetched = await fetch(base, tmp_path / "out", files)
        assert handler.requests[0] == f"/{SPOT_MONTHLY}/BTCUSDT-1m-2019-02.zip.CHECKSUM"
    assert report.splitlines()[0] == (
        "BTCUSDT-1m-2019-02.zip: not in the archive (yet); its days instead"
    )
    assert [f.path.name for f in fetched] == [
        f"BTCUSDT-1m-{first + timedelta(i)}.zip" for i in range(28)
    ]


@pytest.mark.e2e
async def test_the_command_takes_whole_months_monthly_unless_daily(tmp_path: Path) -> None:
    root = archive_root(tmp_path)
    put_zip(root / SPOT_MONTHLY, "BTCUSDT-1m-2019-12.zip", month_rows(date(2019, 12, 1)))
    out = tmp_path / "out"
    args = ("BTCUSDT", "1m", "--from", "2019-12-01", "--to", DAYS[-1], "--out", str(out))
    with archive_server(root) as (base, handler):
        code, stdout, stderr = await run_fetch(*args, "--base-url", base)
        assert code == ExitCode.OK, stderr
        assert "4 files (34 days) in" in stdout and "4 downloaded, 0 already present" in stdout
        handler.requests.clear()
        # --daily: the month's days, which this archive does not have: the first is named
        code, stdout, stderr = await run_fetch(
            *args, "--base-url", base, "--daily", "--attempts", "1"
        )
    assert code == ExitCode.FAILED
    assert handler.requests == [f"/{PREFIX}/BTCUSDT-1m-2019-12-01.zip.CHECKSUM"]
    assert "BTCUSDT-1m-2019-12-01.zip.CHECKSUM: not in the archive (HTTP 404)" in stderr
