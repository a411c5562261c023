"""``tradecanvas fetch-archive SYMBOL INTERVAL --from DAY [--to DAY]``: Binance's public kline
archive (data.binance.vision), downloaded and SHA-256 verified (DESIGN §8).

The archive has a zip per day,
``{base}/data/{spot|futures/um}/daily/klines/SYMBOL/INTERVAL/SYMBOL-INTERVAL-YYYY-MM-DD.zip``,
and one per month, ``…/monthly/klines/SYMBOL/INTERVAL/SYMBOL-INTERVAL-YYYY-MM.zip``, each
with ``.CHECKSUM`` beside it (``<sha256>  <name>``, Binance's own digest). The range is
fetched as a month's zip for each whole calendar month in it and a day's zip for the rest
(:func:`archive_files`; ``--daily``: days only); a month the archive does not have (404: the
current month, or one not published yet) is fetched as its days instead. A download streams
into ``<name>.part`` in the output folder, hashing as it goes; only when the digest equals the
``.CHECKSUM``'s (and the zip opens and holds what its name says, within the bound of what
such a file can hold: ``archive_layout.check_zip``) is it renamed into place, the
``.CHECKSUM`` written beside it and, with ``--extract``, its CSV. A mismatch or a broken zip
is refused and nothing of that file is kept. A file whose zip and ``.CHECKSUM`` are already
there and agree is not fetched again, so a re-run (or a run after Ctrl-C) fetches only what
is missing. ``--csv FILE`` also writes the files' candles joined into one
``open_time,open,high,low,close,volume`` CSV, the layout ``tradecanvas replay`` and the tests
read, each row checked as ``import`` checks it. ``make test-data`` runs this command.

The checksum comes from the same server as the zip, so the sizes are bounded too: a zip
(``ArchiveDay.max_zip_bytes``) or a ``.CHECKSUM`` (:data:`MAX_CHECKSUM_BYTES`) whose
Content-Length says more is refused before its body is read, and a body that grows past the
bound is cut. Files are asked for unencoded (``Accept-Encoding: identity``); a response
encoded anyway is refused. Every file is written through a ``.part`` made afresh
(``archive_layout.create_part``: never through a link), then renamed.

Errors (each message names the URL or the file)::

    httpx.TransportError, timeouts, HTTP 5xx, 429 ─ retried with backoff ─▶ ArchiveError
    HTTP 404 (not in the archive)  ─────────── NotInArchive (an ArchiveError) ─▶ a month: its days
    other 4xx                      ────────────────────────────────────────▶ ArchiveError
    digest ≠ .CHECKSUM, malformed .CHECKSUM, a zip that does not open ────▶ ArchiveError
    a body past its bound, a zip holding more or other than its CSV ─────▶ ArchiveError
    a bad row (--csv), a .part that is a link or another user's ───────▶ ArchiveError

Exit codes (:data:`EXIT_CODES`): 0 every file present and verified; 1 a file failed (those
verified before it stay); 2 bad arguments; 130 on Ctrl-C (the file being fetched is dropped).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import date
from pathlib import Path
from typing import Final, Literal, TextIO, TypeVar, final

import attrs
import httpx
import trio

from tradecanvas.errors import ExitCode
from tradecanvas.tools.archive_layout import (
    MARKET_PATHS,
    MAX_CHECKSUM_BYTES,
    ArchiveDay,
    ArchiveError,
    NotInArchive,
    archive_days,
    archive_files,
    check_zip,
    create_part,
    discard_part,
    extract_csv,
    parse_checksum,
    present,
    six_column_rows,
    write_part,
)
from tradecanvas.tools.exit_codes import ExitCodeTable
from tradecanvas.upstream.backoff import Backoff

ARCHIVE_URL: Final = "https://data.binance.vision"
HTTP_TIMEOUT_S: Final = 30.0
HEADER: Final = "open_time,open,high,low,close,volume"
EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "every file is present and matches Binance's .CHECKSUM"),
    (ExitCode.FAILED, "a file failed: fetch, checksum, bound or bad row (those before stay)"),
    (ExitCode.USAGE, "bad arguments; nothing was fetched"),
    (ExitCode.INTERRUPTED, "Ctrl-C: the file being fetched is dropped"),
)
T = TypeVar("T")


@attrs.frozen
class FetchPolicy:
    """Attempts per file and the backoff between them (timeouts, transport errors, 5xx, 429)."""

    attempts: int = 4
    backoff_base_s: float = 0.5
    backoff_cap_s: float = 8.0

    @property
    def backoff(self) -> Backoff:
        return Backoff(self.backoff_base_s, self.backoff_cap_s)


@attrs.frozen
class Fetched:
    """What became of one day: ``downloaded`` or ``present`` (verified, not fetched again)."""

    day: ArchiveDay
    path: Path
    status: Literal["downloaded", "present"]
    size: int


@final
class ArchiveFetcher:
    """Fetches archive days into a folder over one ``httpx.AsyncClient`` (passed in; the
    caller owns it). Raises ArchiveError; never raises httpx errors."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        base_url: str = ARCHIVE_URL,
        policy: FetchPolicy | None = None,
    ) -> None:
        self.http = http
        self.base_url = base_url.rstrip("/")
        self.policy = policy or FetchPolicy()
        self.requests = 0

    async def fetch(self, day: ArchiveDay, out_dir: Path, *, extract: bool = False) -> Fetched:
        """``day``'s zip and ``.CHECKSUM`` in ``out_dir`` (and its CSV with ``extract``),
        verified; a day already there and verified is not fetched again."""
        zip_path = out_dir / day.name
        checksum_path = out_dir / (day.name + ".CHECKSUM")
        status: Literal["downloaded", "present"] = "present"
        if not await trio.to_thread.run_sync(present, zip_path, checksum_path):
            await self._download(day, zip_path, checksum_path)
            status = "downloaded"
        if extract:
            csv_path = out_dir / day.csv_name
            await trio.to_thread.run_sync(extract_csv, zip_path, csv_path)
        return Fetched(day, zip_path, status, (await trio.Path(zip_path).stat()).st_size)

    async def _download(self, day: ArchiveDay, zip_path: Path, checksum_path: Path) -> None:
        url = day.url(self.base_url)
        body = await self._get(url + ".CHECKSUM", functools.partial(_read_body, MAX_CHECKSUM_BYTES))
        checksum_text = body.decode(errors="replace")
        expected = parse_checksum(checksum_text, day.name, url + ".CHECKSUM")
        part = zip_path.with_name(zip_path.name + ".part")
        try:
            actual = await self._get(url, functools.partial(_stream_into, part, day.max_zip_bytes))
            if actual != expected:
                raise ArchiveError(
                    f"{url}: SHA-256 {actual} does not match its .CHECKSUM ({expected});"
                    " nothing kept"
                )
            try:
                await trio.to_thread.run_sync(check_zip, part, day.name)
            except ArchiveError as exc:
                raise ArchiveError(f"{url}: {exc}; nothing kept") from None
            await trio.to_thread.run_sync(
                write_part, checksum_path, lambda f: f.write(checksum_text.encode())
            )
            await trio.Path(part).replace(zip_path)
        finally:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(discard_part, part)

    async def _get(self, url: str, read: Callable[[httpx.Response], Awaitable[T]]) -> T:
        """GET ``url`` and ``read`` its 200 response, with retries and backoff."""
        problem = "no attempt made"
        for attempt in range(self.policy.attempts):
            if attempt:
                await trio.sleep(self.policy.backoff.delay(attempt))
            self.requests += 1
            try:
                async with self.http.stream("GET", url) as response:
                    status = response.status_code
                    if status == 200:
                        return await read(response)
                    if status == 404:
                        raise NotInArchive(f"{url}: not in the archive (HTTP 404)")
                    if status < 500 and status != 429:
                        raise ArchiveError(f"{url}: HTTP {status}")
                    problem = f"HTTP {status}"
            except httpx.TimeoutException as exc:
                problem = f"timed out ({type(exc).__name__})"
            except httpx.ConnectError as exc:
                problem = f"cannot reach it: {type(exc).__name__}: {exc}"
            except httpx.TransportError as exc:  # such as the connection cut mid-body
                problem = f"transfer failed: {type(exc).__name__}: {exc}"
            except httpx.HTTPError as exc:  # decoding, redirects: not worth a retry
                raise ArchiveError(f"{url}: {type(exc).__name__}: {exc}") from None
        raise ArchiveError(f"{url}: {problem} (gave up after {self.policy.attempts} attempts)")


def _bounded(response: httpx.Response, limit: int) -> None:
    """Refuse, before reading its body, a response encoded (its bytes would be inflated) or
    whose Content-Length is past ``limit``."""
    encoding = response.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        raise ArchiveError(
            f"{response.url}: sent with Content-Encoding {encoding[:40]!r} though asked for"
            " none; not read"
        )
    declared = response.headers.get("content-length", "").strip()
    if declared.isdigit() and int(declared) > limit:
        raise ArchiveError(
            f"{response.url}: {int(declared):,} bytes (Content-Length); a file of its kind is"
            f" at most {limit:,}: not read"
        )


async def _take(
    response: httpx.Response, limit: int, take: Callable[[bytes], Awaitable[object]]
) -> None:
    """Hand the body's chunks to ``take`` as they arrive (after :func:`_bounded`); once past
    ``limit`` bytes, raise ArchiveError. The response is closed first and the loop goes on,
    so that the next read fails at the socket: every generator of httpx's stream ends then
    (one left behind by a ``break`` would be finalized by the garbage collector)."""
    _bounded(response, limit)
    size = 0
    try:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > limit:
                await response.aclose()
                continue
            await take(chunk)
    except (httpx.HTTPError, httpx.StreamError):  # the read after the close
        if size <= limit:
            raise
    if size > limit:
        raise ArchiveError(
            f"{response.url}: the body grew past {limit:,} bytes, the most a file of its kind"
            " holds: cut, nothing kept"
        )


async def _read_body(limit: int, response: httpx.Response) -> bytes:
    """The body, of at most ``limit`` bytes."""
    body = bytearray()

    async def take(chunk: bytes) -> None:
        body.extend(chunk)

    await _take(response, limit, take)
    return bytes(body)


async def _stream_into(path: Path, limit: int, response: httpx.Response) -> str:
    """The body, of at most ``limit`` bytes, streamed into ``path`` (created afresh:
    :func:`create_part`); returns its SHA-256 (hex)."""
    _bounded(response, limit)
    digest = hashlib.sha256()
    raw = await trio.to_thread.run_sync(create_part, path)
    async with trio.wrap_file(raw) as f:

        async def take(chunk: bytes) -> None:
            digest.update(chunk)
            await f.write(chunk)

        await _take(response, limit, take)
    return digest.hexdigest()


async def fetch_days(
    days: Sequence[ArchiveDay],
    out_dir: Path,
    *,
    base_url: str = ARCHIVE_URL,
    policy: FetchPolicy | None = None,
    extract: bool = False,
    report: TextIO | None = None,
) -> list[Fetched]:
    """Fetch ``days`` (files: days or months) in order into ``out_dir`` (created); one line
    per file on ``report``. A month the archive does not have is fetched as its days. Raises
    ArchiveError at the first file that fails (the files before it stay)."""
    await trio.Path(out_dir).mkdir(parents=True, exist_ok=True)
    done: list[Fetched] = []
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(HTTP_TIMEOUT_S),
        headers={"user-agent": "tradecanvas", "accept-encoding": "identity"},
    ) as http:
        fetcher = ArchiveFetcher(http, base_url, policy)
        todo = list(reversed(days))
        while todo:
            day = todo.pop()
            try:
                fetched = await fetcher.fetch(day, out_dir, extract=extract)
            except NotInArchive:
                if day.period == "daily":
                    raise
                if report is not None:
                    report.write(f"{day.name}: not in the archive (yet); its days instead\n")
                todo.extend(reversed(day.days))
                continue
            done.append(fetched)
            if report is not None:
                what = "downloaded" if fetched.status == "downloaded" else "already present"
                report.write(f"{day.name}: {what}, SHA-256 verified ({fetched.size:,} bytes)\n")
    return done


def write_joined_csv(fetched: Sequence[Fetched], csv_path: Path) -> int:
    """The files' klines, in order, as one six-column CSV with a header (written atomically,
    through a ``.part`` made afresh); returns the number of rows. Every row is checked as
    ``import`` checks it: a bad one raises ArchiveError naming its file and line, and
    nothing is written."""
    rows = [HEADER]
    for f in fetched:
        try:
            rows.extend(six_column_rows(f.path))
        except ArchiveError as exc:
            raise ArchiveError(f"{exc}; {csv_path} not written") from None
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    text = ("\n".join(rows) + "\n").encode()
    write_part(csv_path, lambda out: out.write(text))
    return len(rows) - 1


# --- command line --------------------------------------------------------------------


def _day_arg(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day such as 2020-01-01") from None


def _attempts_arg(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 20:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number in 1..20")
    return int(text)


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``fetch-archive`` arguments to ``parser``."""
    parser.add_argument("symbol", metavar="SYMBOL", help="Binance symbol, such as BTCUSDT")
    parser.add_argument("interval", metavar="INTERVAL", help="kline interval, such as 1m")
    parser.add_argument(
        "--from", dest="first", required=True, type=_day_arg, metavar="DAY", help="first day"
    )
    parser.add_argument(
        "--to",
        dest="last",
        type=_day_arg,
        default=None,
        metavar="DAY",
        help="last day, included (default: the --from day)",
    )
    parser.add_argument(
        "--market", choices=sorted(MARKET_PATHS), default="spot", help="spot or USDⓈ-M (um)"
    )
    parser.add_argument(
        "--out", type=Path, default=Path("."), metavar="DIR", help="where the zips go (default .)"
    )
    parser.add_argument(
        "--daily",
        action="store_true",
        help="daily zips only (default: a month's zip for each whole month in the range)",
    )
    parser.add_argument(
        "--extract", action="store_true", help="also write each file's CSV beside its zip"
    )
    parser.add_argument(
        "--csv",
        type=Path,
        default=None,
        metavar="FILE",
        help="also write the files joined as one open_time,open,high,low,close,volume CSV",
    )
    parser.add_argument(
        "--base-url",
        default=ARCHIVE_URL,
        metavar="URL",
        help=f"the archive's address (default {ARCHIVE_URL})",
    )
    parser.add_argument(
        "--attempts",
        type=_attempts_arg,
        default=FetchPolicy().attempts,
        metavar="N",
        help=f"attempts per file (default {FetchPolicy().attempts})",
    )


def run_fetch_archive(
    args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the ``fetch-archive`` command; returns one of :data:`EXIT_CODES`."""
    out = out or sys.stdout
    err = err or sys.stderr
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    try:
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", args.base_url):
            raise ArchiveError(f"--base-url: {args.base_url!r} is not an http(s) URL")
        plan = archive_days if args.daily else archive_files
        days = plan(args.market, args.symbol, args.interval, args.first, args.last or args.first)
    except ArchiveError as exc:
        err.write(f"tradecanvas fetch-archive: {exc}\n")
        return ExitCode.USAGE
    policy = FetchPolicy(attempts=args.attempts)
    try:
        fetched = trio.run(
            functools.partial(
                fetch_days,
                days,
                args.out,
                base_url=args.base_url,
                policy=policy,
                extract=args.extract,
                report=out,
            )
        )
        if args.csv is not None:
            rows = write_joined_csv(fetched, args.csv)
            out.write(f"{args.csv}: {rows:,} candles from {len(fetched)} files\n")
    except ArchiveError as exc:
        err.write(f"tradecanvas fetch-archive: {exc}\n")
        return ExitCode.FAILED
    except OSError as exc:
        err.write(f"tradecanvas fetch-archive: {exc}\n")
        return ExitCode.FAILED
    except KeyboardInterrupt:
        err.write("tradecanvas fetch-archive: interrupted; the days verified before stay\n")
        return ExitCode.INTERRUPTED
    downloaded = sum(f.status == "downloaded" for f in fetched)
    covered = sum(len(f.day.days) for f in fetched)
    out.write(
        f"{len(fetched)} files ({covered} days) in {args.out}: {downloaded} downloaded,"
        f" {len(fetched) - downloaded} already present; all SHA-256 verified\n"
    )
    return ExitCode.OK
