"""Binance's kline archive (data.binance.vision) as files: its layout — a zip per day and per
month, :class:`ArchiveDay`, :func:`archive_files` — and the checks of a zip on disk against
the ``.CHECKSUM`` beside it. The downloads are ``tools/archive_fetch.py``'s."""

from __future__ import annotations

import hashlib
import re
import zipfile
from calendar import monthrange
from datetime import date, timedelta
from pathlib import Path
from typing import Final, Literal

import attrs

from tradecanvas.errors import TradeCanvasError

MARKET_PATHS: Final = {"spot": "spot", "um": "futures/um"}
# the archive's interval names (its month is 1mo)
INTERVALS: Final = (
    *("1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h"),
    *("1d", "3d", "1w", "1mo"),
)
CHUNK_BYTES: Final = 64 * 1024
MAX_DAYS: Final = 3660  # ten years of daily files: a typo in --from, not a plan
Market = Literal["spot", "um"]
Period = Literal["daily", "monthly"]


class ArchiveError(TradeCanvasError):
    """A file of the archive could not be fetched, or was refused; the message names the URL
    (or the file) and why."""


class NotInArchive(ArchiveError):
    """The archive has no such file (HTTP 404)."""


@attrs.frozen
class ArchiveDay:
    """One kline zip of the archive: a day's, or (``period`` monthly) the month's that
    ``day``, its first day, opens."""

    market: Market
    symbol: str
    interval: str
    day: date
    period: Period = "daily"

    @property
    def last_day(self) -> date:
        if self.period == "daily":
            return self.day
        return self.day.replace(day=monthrange(self.day.year, self.day.month)[1])

    @property
    def days(self) -> list[ArchiveDay]:
        """The daily files this one covers."""
        count = (self.last_day - self.day).days + 1
        return [
            attrs.evolve(self, day=self.day + timedelta(i), period="daily") for i in range(count)
        ]

    @property
    def name(self) -> str:
        when = self.day.isoformat() if self.period == "daily" else self.day.strftime("%Y-%m")
        return f"{self.symbol}-{self.interval}-{when}.zip"

    @property
    def csv_name(self) -> str:
        return self.name.removesuffix(".zip") + ".csv"

    def url(self, base_url: str) -> str:
        prefix = MARKET_PATHS[self.market]
        return (
            f"{base_url.rstrip('/')}/data/{prefix}/{self.period}/klines/"
            f"{self.symbol}/{self.interval}/{self.name}"
        )


def archive_files(
    market: Market, symbol: str, interval: str, first: date, last: date
) -> list[ArchiveDay]:
    """The files of ``first..last`` (both included), in order: a month's zip for each whole
    calendar month in the range, a day's for every other day. Raises ArchiveError as
    :func:`archive_days`."""
    files: list[ArchiveDay] = []
    for daily in archive_days(market, symbol, interval, first, last):
        if files and daily.day <= files[-1].last_day:
            continue  # in the month before
        month = attrs.evolve(daily, period="monthly")
        files.append(month if daily.day.day == 1 and month.last_day <= last else daily)
    return files


def archive_days(
    market: Market, symbol: str, interval: str, first: date, last: date
) -> list[ArchiveDay]:
    """The days ``first..last``, both included, a daily file each. Raises ArchiveError for a
    bad symbol, interval or range (the message names the argument)."""
    if not re.fullmatch(r"[A-Z0-9]{2,30}", symbol):
        raise ArchiveError(f"SYMBOL: {symbol!r} is not a Binance symbol such as BTCUSDT")
    if interval not in INTERVALS:
        raise ArchiveError(f"INTERVAL: {interval!r} is not one of {', '.join(INTERVALS)}")
    if last < first:
        raise ArchiveError(f"--to: {last} is before --from ({first})")
    count = (last - first).days + 1
    if count > MAX_DAYS:
        raise ArchiveError(f"--from/--to: {count} days is more than {MAX_DAYS}")
    return [ArchiveDay(market, symbol, interval, first + timedelta(days=i)) for i in range(count)]


def parse_checksum(text: str, name: str, where: str) -> str:
    """The SHA-256 (lower-case hex) in a ``.CHECKSUM`` file's ``text``: ``<hex>  <name>``.
    Raises ArchiveError naming ``where`` if it is malformed or names another file."""
    fields = text.split()
    if not fields or not re.fullmatch(r"[0-9a-fA-F]{64}", fields[0]):
        raise ArchiveError(f"{where}: not a SHA-256 checksum file: {text[:100]!r}")
    if len(fields) > 1 and fields[1].lstrip("*") != name:
        raise ArchiveError(f"{where}: the checksum is for {fields[1]!r}, not {name!r}")
    return fields[0].lower()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_zip(zip_path: Path, checksum_path: Path) -> None:
    """Check a zip against the ``.CHECKSUM`` beside it (its digest, then that it opens).
    Raises ArchiveError naming the file. Blocking: call it from a thread in trio code."""
    try:
        expected = parse_checksum(
            checksum_path.read_text(errors="replace"), zip_path.name, str(checksum_path)
        )
    except OSError as exc:
        raise ArchiveError(f"{checksum_path}: {exc.strerror or exc}") from None
    actual = file_sha256(zip_path)
    if actual != expected:
        raise ArchiveError(f"{zip_path}: SHA-256 {actual} does not match {checksum_path.name}")
    check_zip(zip_path)


def check_zip(zip_path: Path) -> None:
    """Raises ArchiveError unless ``zip_path`` is a zip whose members all read back."""
    try:
        with zipfile.ZipFile(zip_path) as archive:
            broken = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise ArchiveError(f"{zip_path}: not a readable zip ({exc})") from None
    if broken is not None:
        raise ArchiveError(f"{zip_path}: member {broken} is corrupt")


def present(zip_path: Path, checksum_path: Path) -> bool:
    """Already fetched and still matching its checksum (a re-run skips it)."""
    if not (zip_path.is_file() and checksum_path.is_file()):
        return False
    try:
        verify_zip(zip_path, checksum_path)
    except ArchiveError:
        return False
    return True


def extract_csv(zip_path: Path, csv_path: Path) -> None:
    """The zip's CSV member (the archive holds one) written beside it, atomically."""
    with zipfile.ZipFile(zip_path) as archive:
        members = [n for n in archive.namelist() if n.endswith(".csv")]
        if len(members) != 1:
            raise ArchiveError(f"{zip_path}: expected one CSV inside, found {members}")
        data = archive.read(members[0])
    part = csv_path.with_name(csv_path.name + ".part")
    part.write_bytes(data)
    part.replace(csv_path)


def six_column_rows(zip_path: Path) -> list[str]:
    """The zip's klines as ``open_time,open,high,low,close,volume`` lines (open time in ms;
    a header row dropped, microsecond open times of the 2025+ spot files converted)."""
    with zipfile.ZipFile(zip_path) as archive:
        text = archive.read(archive.namelist()[0]).decode()
    lines = []
    for row in csv_lines(text):
        fields = row.split(",")
        open_time = int(fields[0])
        if open_time > 10**15:
            open_time //= 1000
        lines.append(",".join([str(open_time), *fields[1:6]]))
    return lines


def csv_lines(text: str) -> list[str]:
    """The data rows of an archive CSV (a header row, if any, dropped)."""
    return [line for line in text.splitlines() if line[:1].isdigit()]
