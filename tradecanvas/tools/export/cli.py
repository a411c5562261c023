"""``tradecanvas export``: read the store in windows, write the archive's CSV lines."""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Final, TextIO

import attrs
import trio

from tradecanvas.errors import BadInputError, ExitCode, SeriesIdError, StoreError
from tradecanvas.model import SeriesId
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import is_database_url, open_store, store_location
from tradecanvas.tools.backfill.plan import TIME_EXAMPLES, parse_time
from tradecanvas.tools.command import FlagCommand
from tradecanvas.tools.exit_codes import ExitCodeTable
from tradecanvas.wire.archive import archive_lines

# candles read per store query
WINDOW_CANDLES: Final = 50_000
EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "written (the count goes to stderr)"),
    (
        ExitCode.USAGE,
        "bad arguments: a bad series or time, --to not after --from, a series the store"
        " holds no candle of",
    ),
    (
        ExitCode.STORE_FAILURE,
        "no store at the path, the store failed, or the output file could not be written"
        " (an existing --out file is left as it was), or --out is a symbolic link another"
        " user could have made",
    ),
    (ExitCode.STORE_TOO_NEW, "the store's schema is newer than this release (a rollback)"),
)


class UnknownSeriesError(BadInputError):
    """The store holds no candle of the series (a typo, or a timeframe not derived)."""


async def export_csv(
    store: MarketStore,
    series: SeriesId,
    start: int,
    end: int,
    out: TextIO,
    *,
    header: bool = False,
) -> int:
    """Write ``series``' candles of ``[start, end)`` to ``out``; returns how many."""
    written = 0
    sid = str(series)
    step = WINDOW_CANDLES * series.timeframe.seconds
    first = True
    cursor = start
    while cursor < end:
        upto = min(end, cursor + step)
        stored = await store.range(sid, cursor, upto)
        out.writelines(
            archive_lines(
                (s.candle for s in stored), timeframe=series.timeframe, header=first and header
            )
        )
        first = False
        written += len(stored)
        cursor = upto
    return written


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``export`` arguments (the flag options are added by the CLI)."""
    parser.add_argument(
        "series", metavar="SERIES", help="series_id, such as binance:spot:BTC/USDT:1m"
    )
    parser.add_argument(
        "--from",
        dest="from_time",
        required=True,
        metavar="T",
        help=f"first candle: {TIME_EXAMPLES}",
    )
    parser.add_argument(
        "--to", dest="to_time", required=True, metavar="T", help="end of the range, exclusive"
    )
    parser.add_argument(
        "--format", choices=("csv",), default="csv", help="the archive's CSV layout (the only one)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, metavar="FILE", help="write here (default: stdout)"
    )
    parser.add_argument(
        "--header", action="store_true", help="start with the archive's header row (as USDⓈ-M)"
    )


def _plan(args: argparse.Namespace) -> tuple[SeriesId, int, int]:
    try:
        series = SeriesId.parse(args.series)
    except SeriesIdError as exc:
        raise BadInputError(str(exc)) from None
    start = parse_time("--from", args.from_time)
    end = parse_time("--to", args.to_time)
    if end <= start:
        raise BadInputError("--to must be after --from")
    return series, start, end


async def _run(
    location: str | Path, series: SeriesId, start: int, end: int, out: TextIO, header: bool
) -> int:
    store = await open_store(location, writes=False)
    try:
        if await store.head_time(str(series)) is None:
            raise UnknownSeriesError(f"the store holds no candle of {series}")
        return await export_csv(store, series, start, end, out, header=header)
    finally:
        with trio.CancelScope(shield=True):
            await store.aclose()


class OutputRefused(OSError):
    """``--out`` is a symbolic link this process should not write through."""


# O_PATH: a folder is held as a place to walk from, which asks for search permission only,
# as the kernel's own path walk does (O_RDONLY also asked to list it: a folder the user may
# pass through but not list, mode 0711, was refused)
_DIR_FLAGS: Final = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _link_problem(folder: str, folder_fd: int, name: str) -> str | None:
    """Why the symbolic link ``name`` in the open folder ``folder_fd`` (``folder``, for the
    message) may have been put there by another user (who could point it at any file this
    process may write: run as root, any file): it is not owned by this process's user, or
    its folder is writable by every user (another user could swap it, or, with the sticky
    bit, have made it). None when neither."""
    st = os.lstat(name, dir_fd=folder_fd)
    if st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not this process's (uid {os.geteuid()})"
    if os.fstat(folder_fd).st_mode & stat.S_IWOTH:
        return f"in {folder}, a folder every user may write"
    return None


@attrs.define
class _Place:
    """Where ``--out`` writes: ``name`` (not a symbolic link when walked; maybe none yet)
    in the folder open as ``folder_fd`` — held open, so a folder on the way renamed or
    swapped for a link after the walk changes nothing: the file goes where the walk
    checked. ``path`` names it in messages."""

    folder_fd: int
    name: str
    path: str


def _walk(path: Path) -> _Place:
    """The file ``--out`` names, following its symbolic links — the last one and every
    folder's on the way — only when each is this process's user's own in a folder no
    other user may write (raises OutputRefused). The path is walked one name at a time
    (as the kernel does, ``..`` after a link going up from where the link led), each
    folder opened from the one before without following a link: nothing is followed
    unchecked, and nothing checked can be swapped afterwards. The caller closes
    ``folder_fd``."""
    left = os.path.join(os.getcwd(), path).split("/")[::-1]  # next name last
    here = hop = "/"
    links = 0
    fd = os.open("/", _DIR_FLAGS)
    try:
        while True:
            while left and left[-1] in ("", "."):
                left.pop()
            if not left:  # the path names a folder: as writing to it would
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
            name = left.pop()
            if name == "..":
                fd = _enter(fd, "..")
                here = hop = os.path.dirname(here)
                continue
            hop = os.path.join(here, name)
            last = not any(n not in ("", ".") for n in left)
            try:
                is_link = stat.S_ISLNK(os.lstat(name, dir_fd=fd).st_mode)
            except FileNotFoundError:
                if last:  # the new file
                    return _Place(fd, name, hop)
                raise
            if not is_link:
                if last:
                    return _Place(fd, name, hop)
                fd = _enter(fd, name)
                here = hop
                continue
            links += 1
            if links > 40:  # the kernel's own limit of links followed (ELOOP)
                raise OutputRefused(f"--out {path}: too many levels of symbolic links")
            if (why := _link_problem(here, fd, name)) is not None:
                raise OutputRefused(
                    f"--out {path}: not written through the symbolic link {hop}, {why}: give"
                    " the file's own path"
                )
            target = os.readlink(name, dir_fd=fd)
            if target.startswith("/"):
                fd = _enter(fd, "/")
                here = "/"
            left.extend(target.split("/")[::-1])
    except BaseException as exc:
        os.close(fd)
        if type(exc) is not OutputRefused and isinstance(exc, OSError) and exc.errno:
            raise type(exc)(exc.errno, exc.strerror, hop) from None  # the path, not a name
        raise


def _enter(fd: int, name: str) -> int:
    """The folder ``name`` in the open folder ``fd`` (never through a link), opened;
    ``fd`` closed (left open when the folder could not be opened)."""
    folder = os.open(name, _DIR_FLAGS, dir_fd=fd)
    os.close(fd)
    return folder


@contextlib.contextmanager
def _output(path: Path) -> Iterator[TextIO]:
    """Where ``--out`` writes (:func:`_walk`): a regular file (or none yet) is replaced
    whole (:func:`_replacing`); anything else — a device, a FIFO, a terminal — is written
    through, never replaced."""
    place = _walk(path)
    try:
        try:
            st: os.stat_result | None = os.stat(
                place.name, dir_fd=place.folder_fd, follow_symlinks=False
            )
        except FileNotFoundError:
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            flags = os.O_WRONLY | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
            fd = os.open(place.name, flags, dir_fd=place.folder_fd)
            with open(fd, "w", encoding="utf-8", newline="") as stream:
                yield stream
        else:
            with _replacing(place, st) as stream:
                yield stream
    finally:
        os.close(place.folder_fd)


@contextlib.contextmanager
def _replacing(place: _Place, old: os.stat_result | None) -> Iterator[TextIO]:
    """A new file beside ``place`` (made as any new file, with the mode of ``old``, the
    file there now) that replaces it only when the block ends without an error; else it is
    removed, and the file there stays as it was. Made with ``O_EXCL | O_NOFOLLOW`` under a
    name nobody can guess: never another's file or link."""
    partial = f".{place.name}.{os.getpid()}.{secrets.token_hex(4)}.partial"
    folder = place.folder_fd
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(partial, flags, 0o666, dir_fd=folder)  # less the umask
    except OSError as exc:  # named as the file it was made for
        raise type(exc)(exc.errno, exc.strerror, place.path) from None
    try:
        with open(fd, "w", encoding="utf-8", newline="") as target:
            yield target
            if old is not None:  # its permission bits, never set-id
                os.fchmod(target.fileno(), stat.S_IMODE(old.st_mode) & 0o777)
        os.replace(partial, place.name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial, dir_fd=folder)
        raise


@FlagCommand
def run_export(args: argparse.Namespace, flags: RuntimeFlags, out: TextIO, err: TextIO) -> int:
    """Run ``export`` with :func:`configure_parser`'s arguments; one of :data:`EXIT_CODES`."""
    try:
        series, start, end = _plan(args)
    except BadInputError as exc:
        err.write(f"tradecanvas export: {exc}\n")
        return ExitCode.USAGE
    location = store_location(flags.db_path, flags.database_url)
    if not is_database_url(location) and not Path(location).is_file():
        # a read: never a new empty store at a mistyped path
        err.write(f"tradecanvas export: no candle store at {location}\n")
        return ExitCode.STORE_FAILURE
    try:
        if args.out is None:
            written = trio.run(_run, location, series, start, end, out, args.header)
        else:
            with _output(args.out) as target:
                written = trio.run(_run, location, series, start, end, target, args.header)
    except UnknownSeriesError as exc:
        err.write(f"tradecanvas export: {exc}\n")
        return ExitCode.USAGE
    except (StoreError, OSError) as exc:
        err.write(f"tradecanvas export: {exc}\n")
        return ExitCode.for_store_error(exc)
    err.write(f"tradecanvas export: {written:,} candles of {series}\n")
    return ExitCode.OK
