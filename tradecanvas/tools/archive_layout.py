"""Binance's kline archive (data.binance.vision) as files: its layout — a zip per day and per
month, :class:`ArchiveDay`, :func:`archive_files` — and the checks of a zip on disk against
the ``.CHECKSUM`` beside it. The downloads are ``tools/archive_fetch.py``'s.

A zip's checksum comes from the same place as the zip, so it proves nothing against a
hostile archive. What a zip may hold is bounded by what such a file can hold
(:attr:`~tradecanvas.wire.archive.ArchiveName.max_csv_bytes`): exactly one member, the CSV of
the zip's own name, stored or deflated, declaring no more than the bound, and read in
chunks that stop once past it (:func:`zip_member`, :func:`read_member`; ``import`` reads its
zips the same way). Files are written through ``<name>.part`` files created afresh
(:func:`create_part`: never through a link or a file someone else left there), then renamed.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import stat
import time
import zipfile
import zlib
from calendar import monthrange
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from itertools import islice
from pathlib import Path
from typing import BinaryIO, Final, Literal, Protocol

import attrs

from tradecanvas.errors import TradeCanvasError, WireError
from tradecanvas.model import CLOCK_SKEW_S, MS
from tradecanvas.wire.archive import (
    ArchiveName,
    archive_timeframe,
    parse_archive_name,
    parse_archive_rows,
)

MARKET_PATHS: Final = {"spot": "spot", "um": "futures/um"}
# the archive's interval names (its month is 1mo)
INTERVALS: Final = (
    *("1s", "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h"),
    *("1d", "3d", "1w", "1mo"),
)
CHUNK_BYTES: Final = 64 * 1024
# a .CHECKSUM is one line: 64 hex digits, two spaces, the zip's name
MAX_CHECKSUM_BYTES: Final = 4096
# the zip methods read (Binance's: deflate); bzip2 and lzma inflate a whole input chunk at once
READABLE_METHODS: Final = frozenset({zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED})
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

    @property
    def max_zip_bytes(self) -> int:
        """The bound on the zip's size: its CSV's (:func:`max_csv_bytes`), as deflate's
        worst case (a member stored, a thousandth more when deflated) plus the zip's headers."""
        return max_zip_bytes(max_csv_bytes(self.name))

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
    """Check a zip against the ``.CHECKSUM`` beside it (its digest, then that it opens and
    holds what its name says, :func:`check_zip`). Raises ArchiveError naming the file.
    Blocking: call it from a thread in trio code."""
    try:
        if checksum_path.stat().st_size > MAX_CHECKSUM_BYTES:
            raise ArchiveError(f"{checksum_path}: more than {MAX_CHECKSUM_BYTES:,} bytes")
        expected = parse_checksum(
            checksum_path.read_text(errors="replace"), zip_path.name, str(checksum_path)
        )
    except OSError as exc:
        raise ArchiveError(f"{checksum_path}: {exc.strerror or exc}") from None
    actual = file_sha256(zip_path)
    if actual != expected:
        raise ArchiveError(f"{zip_path}: SHA-256 {actual} does not match {checksum_path.name}")
    check_zip(zip_path)


def max_csv_bytes(zip_name: str) -> int:
    """The bound on the CSV a zip of this name (``SYMBOL-INTERVAL-YYYY-MM(-DD).zip``) holds;
    raises ArchiveError for another name."""
    return _archive_name(zip_name).max_csv_bytes


def max_zip_bytes(csv_bytes: int) -> int:
    """The bound on a zip holding a CSV of at most ``csv_bytes``."""
    return csv_bytes + csv_bytes // 1000 + CHUNK_BYTES


def _archive_name(zip_name: str) -> ArchiveName:
    name = parse_archive_name(zip_name)
    if name is None:
        raise ArchiveError(f"{zip_name}: not an archive file name (SYMBOL-INTERVAL-YYYY-MM-DD.zip)")
    return name


def check_zip(zip_path: Path, name: str | None = None) -> None:
    """Raises ArchiveError unless ``zip_path`` is a zip holding exactly the CSV its name
    (``name``: the zip's, when it differs from the path's, a ``.part``) says, within the
    bound of :func:`max_csv_bytes`, that reads back (CRC) without passing it."""
    name = name or zip_path.name
    limit = max_csv_bytes(name)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            info = zip_member(archive, name.removesuffix(".zip") + ".csv", limit)
            read_member(archive, info, limit, out=_Discard())
    except ArchiveError as exc:
        raise ArchiveError(f"{zip_path}: {exc}") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise ArchiveError(f"{zip_path}: not a readable zip ({exc})") from None


def zip_member(archive: zipfile.ZipFile, expected: str | None, limit: int) -> zipfile.ZipInfo:
    """The one member of an archive zip, checked before a byte of it is inflated: the only
    entry, named ``expected`` (None: any ``*.csv`` name without a folder), stored or
    deflated, not encrypted, and declaring at most ``limit`` bytes. Raises ArchiveError
    (the message does not name the zip)."""
    members = archive.infolist()
    if len(members) != 1:
        shown = ", ".join(repr(m.filename[:60]) for m in members[:5])
        raise ArchiveError(
            f"holds {len(members)} members ({shown}); an archive zip holds exactly one CSV"
        )
    info = members[0]
    named = info.filename
    if expected is not None and named != expected:
        raise ArchiveError(f"holds {named[:80]!r}; an archive zip of this name holds {expected!r}")
    if expected is None and (
        not named.lower().endswith(".csv") or "/" in named or "\\" in named or named[:1] == "."
    ):
        raise ArchiveError(f"holds {named[:80]!r}; an archive zip holds one CSV, not in a folder")
    if info.compress_type not in READABLE_METHODS:
        raise ArchiveError(
            f"{named} is compressed with method {info.compress_type}; archive zips are deflated"
        )
    if info.flag_bits & 0x1:
        raise ArchiveError(f"{named} is encrypted")
    if info.file_size > limit:
        raise ArchiveError(
            f"{named} declares {info.file_size:,} bytes; a file of its kind holds at most"
            f" {limit:,} (a zip bomb?): not read"
        )
    return info


def read_member(
    archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, out: Sink | None = None
) -> bytes:
    """The member's bytes inflated :data:`CHUNK_BYTES` at a time (into ``out`` when given:
    then returns b""), stopped with ArchiveError as soon as they pass ``limit`` or the size
    the member declares — whatever its header says, no more is ever inflated. Raises
    zipfile.BadZipFile (a CRC), zlib.error or EOFError for a corrupt member."""
    limit = min(limit, info.file_size)
    parts: list[bytes] = []
    total = 0
    with archive.open(info) as member:
        while chunk := member.read(min(CHUNK_BYTES, limit + 1 - total)):
            total += len(chunk)
            if total > limit:
                raise ArchiveError(
                    f"{info.filename} inflates past {limit:,} bytes (a zip bomb?): not read"
                )
            if out is None:
                parts.append(chunk)
            else:
                out.write(chunk)
    return b"".join(parts)


class Sink(Protocol):
    """Where :func:`read_member` writes (a file opened for bytes)."""

    def write(self, data: bytes, /) -> int: ...


class _Discard:
    def write(self, data: bytes, /) -> int:
        return len(data)


def present(zip_path: Path, checksum_path: Path) -> bool:
    """Already fetched and still matching its checksum (a re-run skips it)."""
    if not (zip_path.is_file() and checksum_path.is_file()):
        return False
    try:
        verify_zip(zip_path, checksum_path)
    except ArchiveError:
        return False
    return True


def create_part(path: Path) -> BinaryIO:
    """``path`` (a ``.part`` file) created afresh for writing: ``O_CREAT | O_EXCL |
    O_NOFOLLOW``, so never written through a symbolic link or into a file another user
    left there. A stale one is removed first only when it is a regular file of this user's;
    anything else there is refused (ArchiveError)."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISREG(found.st_mode) or found.st_uid != os.geteuid():
            kind = "a symbolic link" if stat.S_ISLNK(found.st_mode) else "not a file of ours"
            raise ArchiveError(f"{path} is there and is {kind}: not written through; remove it")
        path.unlink()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o666)
    except FileExistsError:
        raise ArchiveError(f"{path} appeared while it was being created: not written") from None
    return os.fdopen(fd, "wb")


def discard_part(path: Path) -> None:
    """Remove ``path`` if it is a regular file of this user's (a ``.part`` this process
    made); anything else there is left alone."""
    try:
        found = path.lstat()
        if stat.S_ISREG(found.st_mode) and found.st_uid == os.geteuid():
            path.unlink()
    except FileNotFoundError:
        pass


def write_part(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """``write`` into ``path``'s ``.part`` (:func:`create_part`), then renamed onto ``path``
    (a link there is replaced, not followed); nothing of it is left when anything fails."""
    part = path.with_name(path.name + ".part")
    f = create_part(part)
    try:
        with f:
            write(f)
        part.replace(path)
    except BaseException:
        discard_part(part)
        raise


def extract_csv(zip_path: Path, csv_path: Path) -> None:
    """The zip's CSV (:func:`zip_member`, :func:`read_member`) written beside it, atomically."""
    member = zip_path.name.removesuffix(".zip") + ".csv"
    limit = max_csv_bytes(zip_path.name)

    def inflate(f: BinaryIO) -> None:
        try:
            with zipfile.ZipFile(zip_path) as archive:
                read_member(archive, zip_member(archive, member, limit), limit, out=f)
        except ArchiveError as exc:
            raise ArchiveError(f"{zip_path}: {exc}") from None
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise ArchiveError(f"{zip_path}: not a readable zip ({exc})") from None

    write_part(csv_path, inflate)


def six_column_rows(zip_path: Path, now: float | None = None) -> list[str]:
    """The zip's klines as ``open_time,open,high,low,close,volume`` lines (open time in ms;
    a header row dropped, microsecond open times of the 2025+ spot files converted),
    each row checked as ``import`` checks a row (:func:`parse_archive_rows`, for the
    file's interval) and closed by ``now`` (the wall clock). Raises ArchiveError naming
    the file and the line of the first bad row."""
    name = _archive_name(zip_path.name)
    member = zip_path.name.removesuffix(".zip") + ".csv"
    try:
        with zipfile.ZipFile(zip_path) as archive:
            info = zip_member(archive, member, name.max_csv_bytes)
            data = read_member(archive, info, name.max_csv_bytes)
        text = data.decode("utf-8")
        timeframe = archive_timeframe(name.interval)
        candles = parse_archive_rows(
            io.StringIO(text), span=(name.start, name.end), timeframe=timeframe
        )
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ArchiveError(f"{zip_path}: {member} line {line}: not UTF-8 text") from None
    except WireError as exc:
        raise ArchiveError(f"{zip_path}: {member} {exc.detail}") from None
    except ArchiveError as exc:
        raise ArchiveError(f"{zip_path}: {exc}") from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise ArchiveError(f"{zip_path}: not a readable zip ({exc})") from None
    deadline = (time.time() if now is None else now) + CLOCK_SKEW_S
    for index, c in enumerate(candles):
        if timeframe.next_open(c.candle_time) > deadline:
            opens = datetime.fromtimestamp(c.candle_time, UTC).strftime("%Y-%m-%d %H:%M UTC")
            raise ArchiveError(
                f"{zip_path}: {member} line {_row_line(text, index)}: the kline opening at"
                f" {opens} has not closed yet by this machine's clock"
            )
    return [
        f"{c.candle_time * MS},{_plain(c.open)},{_plain(c.high)},{_plain(c.low)},"
        f"{_plain(c.close)},{_plain(c.volume)}"
        for c in candles
    ]


def _row_line(text: str, index: int) -> int:
    """The line number of the ``index``-th row (from 0) of a file the parser read: blank
    lines and a header are no rows."""
    numbers = (
        number
        for number, line in enumerate(io.StringIO(text), start=1)
        if line.strip() and (number > 1 or line[:1].isdigit())
    )
    return next(islice(numbers, index, None), 0)


def _plain(value: Decimal) -> str:
    return format(value, "f")
