"""The files ``tradecanvas import`` reads: which ones, which series each holds, and their
candles — a zip's ``.CHECKSUM`` verified before anything of it is read.

Everything here is synchronous (the command runs it on a worker thread). A file that cannot
be imported raises :class:`ArchiveFileError` naming it (and the line, for a bad row); nothing
of it has been handed on by then.

A zip's ``.CHECKSUM`` comes from wherever the zip came from, so it does not stop a zip bomb:
a zip is read as ``fetch-archive`` reads one (``tools/archive_layout.py``: one member, the CSV
of the zip's name, declaring and inflating to no more than such a file can hold — a daily
file 1,440 rows, a monthly one its month's minutes, a zip whose name does not say a 31-day
month's — at :data:`~tradecanvas.wire.archive.MAX_ROW_BYTES` a row).
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import time
import zipfile
import zlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import attrs

from tradecanvas.errors import BadInputError, SeriesIdError, WireError
from tradecanvas.model import CLOCK_SKEW_S, DAY, MINUTE, Candle, Market, SeriesId
from tradecanvas.pipeline.commit import collector_paused
from tradecanvas.tools.archive_layout import (
    MAX_CHECKSUM_BYTES,
    ArchiveError,
    read_member,
    zip_member,
)
from tradecanvas.wire.archive import (
    HEADER_NAMES,
    MAX_ROW_BYTES,
    SLACK_BYTES,
    ArchiveName,
    market_of_path,
    missing_runs,
    parse_archive_columns,
    parse_archive_name,
    series_for,
)
from tradecanvas.wire.kline_columns import KlineColumns

CHECKSUM_SUFFIX: Final = ".CHECKSUM"
_READ_CHUNK: Final = 1 << 20
# the bound on the CSV of a zip whose name does not give its period: a 31-day month of 1m
UNNAMED_MAX_CSV_BYTES: Final = 31 * DAY // MINUTE * MAX_ROW_BYTES + SLACK_BYTES


class ArchiveFileError(BadInputError):
    """A file refused: bad checksum, corrupt zip, a bad row, the wrong interval."""

    def __init__(self, path: Path, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path


class WrongFileError(ArchiveFileError):
    """A file refused while planning, before anything is read or stored: the wrong interval
    (exit 1, a file refused: nothing of the run imported)."""


@attrs.frozen
class ImportFile:
    """One file to import and the series it holds; ``name`` None when its name is not in the
    archive's layout (``--series`` named the series)."""

    path: Path
    series: SeriesId
    name: ArchiveName | None

    @property
    def expected_rows(self) -> int | None:
        return None if self.name is None else self.name.expected_rows

    @property
    def max_csv_bytes(self) -> int:
        """The bound on the CSV of its zip: what a file of its period can hold."""
        return UNNAMED_MAX_CSV_BYTES if self.name is None else self.name.max_csv_bytes


@attrs.frozen
class ReadFile:
    """A file's candles (by column, checked), and the minutes its period lacks (Binance's
    own holes)."""

    file: ImportFile
    columns: KlineColumns
    checksum: bool  # a .CHECKSUM was beside it and matched
    holes: list[tuple[int, int]]

    @property
    def candles(self) -> list[Candle]:
        return self.columns.candles()

    @property
    def cut(self) -> tuple[int, int] | None:
        """The minutes from the last row to the end of the file's period when they are a day
        or more: a file cut short (a truncated download, a copy) is likelier than a hole at
        Binance (whose maintenance lasts hours), so the summary says so."""
        if self.file.name is None or not self.holes or not len(self.columns):
            return None
        start, end = self.holes[-1]
        return (start, end) if end == self.file.name.end and end - start >= DAY else None


def find_files(arguments: Sequence[Path]) -> list[Path]:
    """The files named, and the ``.zip``/``.csv`` files under the folders named (sorted). In a
    folder, a ``.csv`` beside the ``.zip`` it was extracted from is left out (the zip is
    read). Raises BadInputError for a path that does not exist or a folder with no file."""
    found: list[Path] = []
    for argument in arguments:
        if argument.is_dir():
            inside = sorted(
                p
                for p in argument.rglob("*")
                if p.is_file() and p.suffix.lower() in (".zip", ".csv")
            )
            zips = {p.with_suffix("") for p in inside if p.suffix.lower() == ".zip"}
            chosen = [
                p for p in inside if p.suffix.lower() == ".zip" or p.with_suffix("") not in zips
            ]
            if not chosen:
                raise BadInputError(f"{argument}: no .zip or .csv file in this folder")
            found += chosen
        elif argument.is_file():
            found.append(argument)
        else:
            raise BadInputError(f"{argument}: no such file or folder")
    return found


def plan_file(path: Path, series: SeriesId | None, market: Market | None) -> ImportFile:
    """Which series ``path`` holds: ``series`` when given, else from its name and ``market``
    (else the path's folders). Raises ArchiveFileError: WrongFileError for a file of another
    interval than 1m; a ``market`` the path's folders contradict is refused."""
    name = parse_archive_name(path.name)
    if name is not None and name.interval != "1m":
        raise WrongFileError(
            path,
            f"holds {name.interval} klines; only 1m is imported (the store derives the rest):"
            " move it out of the files given; nothing imported",
        )
    named = market_of_path(path.resolve().parts)
    if market is not None and named is not None and market != named and series is None:
        raise ArchiveFileError(
            path,
            f"--market {market} contradicts the path, which names {named} (a …/{named}/… or"
            f" …/{'um' if named == 'futures' else 'spot'}/… folder): drop --market to take the"
            " path's, or give --series if the folder is misnamed; nothing imported",
        )
    if series is not None:
        return ImportFile(path, series, name)
    if name is None:
        raise ArchiveFileError(
            path,
            "the name is not SYMBOL-INTERVAL-YYYY-MM(-DD).zip|csv: give the series with --series",
        )
    market = market or named
    if market is None:
        raise ArchiveFileError(
            path, "cannot tell spot from futures by its path: give --market or --series"
        )
    try:
        return ImportFile(path, series_for(name, market), name)
    except WireError as exc:
        raise ArchiveFileError(path, exc.detail or str(exc)) from None


def plan_import(args: argparse.Namespace) -> list[ImportFile]:
    """The files to import and their series; raises BadInputError."""
    if args.batch < 1:
        raise BadInputError("--batch must be at least 1")
    series: SeriesId | None = None
    if args.series is not None:
        try:
            series = SeriesId.parse(args.series)
        except SeriesIdError as exc:
            raise BadInputError(f"--series: {exc}") from None
        if series.timeframe.text != "1m":
            raise BadInputError(f"--series: {series} is not a base (1m) series")
    named = set(args.paths)
    planned: list[ImportFile] = []
    for path in find_files(args.paths):
        try:
            planned.append(plan_file(path, series, args.market))
        except ArchiveFileError as exc:
            if path in named or parse_archive_name(path.name) is not None:
                raise
            raise BadInputError(
                f"{path}: found in a folder given, and its name is not an archive file's"
                " (SYMBOL-1m-YYYY-MM(-DD).zip|csv) — such as the joined CSV `fetch-archive"
                " --csv` writes; nothing imported: move it out of the folder, or name the"
                " archive files to import instead of the folder"
            ) from exc
    return planned


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checksum(path: Path) -> bool:
    """Checks ``path`` against the ``.CHECKSUM`` beside it (``<sha256>  <name>``); False when
    there is none. Raises ArchiveFileError on a mismatch or an unreadable checksum file."""
    checksum = path.with_name(path.name + CHECKSUM_SUFFIX)
    if not checksum.is_file():
        return False
    try:
        with checksum.open("rb") as f:  # a line: no more is read
            text = f.read(MAX_CHECKSUM_BYTES).decode("ascii", errors="replace").split()
    except OSError as exc:
        raise ArchiveFileError(path, f"cannot read {checksum.name}: {exc}") from None
    expected = text[0].lower() if text else ""
    if len(expected) != 64 or any(ch not in "0123456789abcdef" for ch in expected):
        raise ArchiveFileError(path, f"{checksum.name} holds no SHA-256")
    actual = _sha256(path)
    if actual != expected:
        raise ArchiveFileError(
            path, f"SHA-256 {actual} does not match {checksum.name} ({expected}): not imported"
        )
    return True


def _zip_text(file: ImportFile) -> tuple[str, str]:
    """The one CSV inside a zip: (its name, its text). Its member is checked before it is
    inflated, and inflated in chunks up to the bound (``zip_member``, ``read_member``): the
    CSV of the zip's own name (with ``--series`` and another name, any ``*.csv``)."""
    path, limit = file.path, file.max_csv_bytes
    expected = None if file.name is None else path.name[: -len(".zip")] + ".csv"
    try:
        with zipfile.ZipFile(path) as archive:
            info = zip_member(archive, expected, limit)
            data = read_member(archive, info, limit)
    except ArchiveError as exc:
        raise ArchiveFileError(path, f"{exc}; nothing of this file stored") from None
    try:
        return info.filename, data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ArchiveFileError(
            path, f"{info.filename} line {line}: not UTF-8 text; nothing of this file stored"
        ) from None


def read_file(file: ImportFile, now: float | None = None) -> ReadFile:
    """Verify (zip: its .CHECKSUM), unpack and parse ``file``. Raises ArchiveFileError, also
    for a kline that closes more than CLOCK_SKEW_S after ``now`` (the wall clock, unix
    seconds; None: the time now): an archive holds closed klines, and one from the future,
    stored, would be its series' head, every live minute after it a revision below it."""
    path = file.path
    checksum = False
    try:
        if path.suffix.lower() == ".zip":
            checksum = verify_checksum(path)
            inner, text = _zip_text(file)
            where = f"{inner} "
        else:
            text = path.read_text(encoding="utf-8")
            where = ""
    except (zipfile.BadZipFile, zlib.error, EOFError, UnicodeDecodeError) as exc:
        raise ArchiveFileError(path, f"corrupt or truncated: {exc}") from None
    except OSError as exc:
        raise ArchiveFileError(path, f"cannot read it: {exc}") from None
    span = None if file.name is None else (file.name.start, file.name.end)
    try:
        # the rows make no reference cycle: the collector's walks over them (and over the
        # candles read before, still waiting) were a seventh of the parse
        with collector_paused():
            columns = parse_archive_columns(text, span=span)
    except WireError as exc:
        raise ArchiveFileError(path, f"{where}{exc.detail}; nothing of this file stored") from None
    times = columns.times
    _check_closed(path, times, time.time() if now is None else now, text, where)
    if not times:
        holes = [] if span is None else [span]
    elif span is None:
        holes = missing_runs(times, times[0], times[-1] + MINUTE)
    elif len(times) == (span[1] - span[0]) // MINUTE:
        holes = []  # every minute of the period: the rows are ascending, once each, inside it
    else:
        holes = missing_runs(times, *span)
    return ReadFile(file, columns, checksum, holes)


def _check_closed(path: Path, times: Sequence[int], now: float, text: str, where: str) -> None:
    first = bisect.bisect_right(times, now + CLOCK_SKEW_S - MINUTE)  # closes after now + skew
    if first == len(times):
        return
    header = text.split(",", 1)[0].strip().lower() in HEADER_NAMES
    opens = datetime.fromtimestamp(times[first], UTC).strftime("%Y-%m-%d %H:%M UTC")
    raise ArchiveFileError(
        path,
        f"{where}line {first + 1 + header}: the kline opening at {opens} has not closed yet"
        " by this machine's clock; nothing of this file stored",
    )


__all__ = [
    "CHECKSUM_SUFFIX",
    "ArchiveFileError",
    "ImportFile",
    "ReadFile",
    "WrongFileError",
    "find_files",
    "plan_file",
    "plan_import",
    "read_file",
    "verify_checksum",
]
