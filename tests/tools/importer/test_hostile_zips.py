"""``tradecanvas import`` of hostile zips, whose ``.CHECKSUM`` matches (it comes from the same
place, so it proves nothing): a zip bomb is refused before a byte is inflated, a member is
inflated in chunks that stop at the bound, and a zip holding more or other than the CSV of
its name is refused. Memory is measured (tracemalloc) to show the read stopped early."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.tools.importer.rig import SPOT_1M, events, import_into, plan, rows
from tests.tools.zips import (
    DAILY_1M_BOUND,
    DAY_NAME,
    bomb,
    day_rows,
    declare_size,
    measured,
    put_zip,
    set_flag_bits,
)
from tradecanvas.errors import ExitCode
from tradecanvas.model import SeriesId
from tradecanvas.tools.archive_layout import ArchiveError, read_member
from tradecanvas.tools.importer.files import (
    ArchiveFileError,
    plan_file,
    read_file,
    verify_checksum,
)

KIB = 1024
MIB = 1024 * KIB
SERIES = SeriesId.parse(SPOT_1M)


def test_a_zip_bomb_is_refused_by_its_declared_size_before_a_byte_is_inflated(
    tmp_path: Path,
) -> None:
    path = bomb(tmp_path / "spot" / f"{DAY_NAME}.zip", f"{DAY_NAME}.csv", 8 * MIB)
    assert path.stat().st_size < 64 * KIB  # a bomb: 8 MiB in a few KB
    with measured() as peak, pytest.raises(ArchiveFileError) as refused:
        read_file(plan_file(path, None, None))
    assert str(refused.value) == (
        f"{path}: {DAY_NAME}.csv declares 8,388,608 bytes; a file of its kind holds at most"
        f" {DAILY_1M_BOUND:,} (a zip bomb?): not read; nothing of this file stored"
    )
    # nothing inflated (the whole read: 8 MiB, twice); the checksum is hashed a MiB at a time
    assert peak.bytes < 2 * MIB, peak


def test_a_monthly_zip_and_one_of_another_name_are_bound_by_a_month(tmp_path: Path) -> None:
    # a monthly file holds up to its month's minutes: January's 44,640 rows pass the daily
    # bound; with --series and a name that says no period, a 31-day month is the bound
    month = put_zip(tmp_path / "spot" / "BTCUSDT-1m-2020-01.zip", {"BTCUSDT-1m-2020-01.csv": ""})
    assert plan([month])[0].max_csv_bytes == 44_640 * 512 + 4096
    other = put_zip(tmp_path / "mine.zip", {"mine.csv": day_rows(3)})
    [file] = plan([other], SPOT_1M)
    assert file.max_csv_bytes == 44_640 * 512 + 4096
    assert len(read_file(file).candles) == 3
    big = bomb(tmp_path / "big.zip", "big.csv", 44_640 * 512 + 4097)
    with pytest.raises(ArchiveFileError, match=r"big\.csv declares 22,859,777 bytes"):
        read_file(plan_file(big, SERIES, None))


def test_a_member_that_inflates_past_the_cap_is_stopped_early(tmp_path: Path) -> None:
    # the reader does not trust the declared size: asked for at most 100,000 bytes of a
    # member of 8 MiB, it stops once past them, having held little more
    path = bomb(tmp_path / f"{DAY_NAME}.zip", f"{DAY_NAME}.csv", 8 * MIB)
    with zipfile.ZipFile(path) as archive:
        [info] = archive.infolist()
        with measured() as peak, pytest.raises(ArchiveError) as stopped:
            read_member(archive, info, 100_000)
    assert str(stopped.value) == (
        f"{DAY_NAME}.csv inflates past 100,000 bytes (a zip bomb?): not read"
    )
    assert peak.bytes < 1 * MIB, peak
    # a member declaring 1,000 bytes that inflates to 8 MiB: no more than 1,000 come out,
    # and the CRC (of the whole) refuses them
    declare_size(path, 1000)
    with zipfile.ZipFile(path) as archive:
        [info] = archive.infolist()
        with measured() as peak, pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
            read_member(archive, info, DAILY_1M_BOUND)
    assert peak.bytes < 512 * KIB, peak
    with pytest.raises(ArchiveFileError, match="corrupt or truncated: Bad CRC-32"):
        read_file(plan_file(path, SERIES, None))


def test_a_bzip2_bomb_that_declares_a_small_size_is_refused_unread(tmp_path: Path) -> None:
    # bzip2 inflates a whole input chunk at once: 32 MiB from a few hundred bytes, whatever
    # the member declares; only stored and deflated members are read
    path = bomb(
        tmp_path / "spot" / f"{DAY_NAME}.zip", f"{DAY_NAME}.csv", 32 * MIB, method=zipfile.ZIP_BZIP2
    )
    declare_size(path, 1000)
    with measured() as peak, pytest.raises(ArchiveFileError) as refused:
        read_file(plan_file(path, None, None))
    assert str(refused.value) == (
        f"{path}: {DAY_NAME}.csv is compressed with method 12; archive zips are deflated;"
        " nothing of this file stored"
    )
    assert peak.bytes < 2 * MIB, peak  # the whole read: 32 MiB


def _extra(path: Path) -> None:
    put_zip(path, {f"{DAY_NAME}.csv": day_rows(), "README.txt": "hello"})


def _renamed(path: Path) -> None:
    put_zip(path, {"BTCUSDT-1m-2020-01-02.csv": day_rows()})


def _in_a_folder(path: Path) -> None:
    put_zip(path, {f"x/{DAY_NAME}.csv": day_rows()})


def _with_a_folder_entry(path: Path) -> None:
    put_zip(path, {"x/": b"", f"{DAY_NAME}.csv": day_rows()})


def _encrypted(path: Path) -> None:
    put_zip(path, {f"{DAY_NAME}.csv": day_rows()})
    set_flag_bits(path, 0x1)


def _not_utf8(path: Path) -> None:
    lines = day_rows(5).encode().splitlines(keepends=True)
    lines[2] = lines[2].replace(b"1.5", b"\xff", 1)
    put_zip(path, {f"{DAY_NAME}.csv": b"".join(lines)})


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_extra, "holds 2 members ('BTCUSDT-1m-2020-01-01.csv', 'README.txt'); an archive zip"),
        (_renamed, "holds 'BTCUSDT-1m-2020-01-02.csv'; an archive zip of this name holds 'BTC"),
        (_in_a_folder, "holds 'x/BTCUSDT-1m-2020-01-01.csv'; an archive zip of this name holds"),
        (_with_a_folder_entry, "holds 2 members ('x/', 'BTCUSDT-1m-2020-01-01.csv')"),
        (_encrypted, "BTCUSDT-1m-2020-01-01.csv is encrypted"),
        (_not_utf8, "BTCUSDT-1m-2020-01-01.csv line 3: not UTF-8 text"),
    ],
)
async def test_a_zip_holding_more_or_other_than_its_csv_is_refused(
    tmp_path: Path, make: Callable[[Path], None], why: str
) -> None:
    path = tmp_path / "spot" / f"{DAY_NAME}.zip"
    make(path)
    db = tmp_path / "m.sqlite3"
    code, _, error = await import_into(db, plan([path]))
    assert code == ExitCode.FAILED
    assert error is not None and error.startswith(f"{path}: {why}"), error
    assert error.endswith("; nothing of this file stored"), error
    assert await rows(db, SPOT_1M) == []
    assert await events(db) == []


def test_with_series_a_zip_of_another_name_holds_any_one_csv_not_in_a_folder(
    tmp_path: Path,
) -> None:
    good = put_zip(tmp_path / "mine.zip", {"export.csv": day_rows(2)})
    assert len(read_file(plan_file(good, SERIES, None)).candles) == 2
    for member in ("../up.csv", "x/export.csv", "notes.txt"):
        bad = put_zip(tmp_path / "bad.zip", {member: day_rows(2)})
        with pytest.raises(ArchiveFileError, match="an archive zip holds one CSV, not in a folder"):
            read_file(plan_file(bad, SERIES, None))


def test_a_huge_checksum_file_is_not_read_whole(tmp_path: Path) -> None:
    path = put_zip(tmp_path / "spot" / f"{DAY_NAME}.zip", {f"{DAY_NAME}.csv": day_rows(2)})
    checksum = path.with_name(path.name + ".CHECKSUM")
    checksum.write_text(checksum.read_text() + " " * (8 * MIB))
    with measured() as peak:
        assert verify_checksum(path)
    assert peak.bytes < 2 * MIB, peak  # the zip is hashed a MiB at a time
