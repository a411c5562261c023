"""``tradecanvas fetch-archive`` against a real HTTP server on 127.0.0.1 (the standard
library's, in a thread) serving the shared archive files in data.binance.vision's layout."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import date
from pathlib import Path

import pytest
import trio

from tests.conftest import binance_data_dir, read_kline_csv
from tradecanvas.errors import ExitCode
from tradecanvas.tools.archive_fetch import FetchPolicy, fetch_days
from tradecanvas.tools.archive_layout import (
    ArchiveDay,
    ArchiveError,
    archive_days,
    parse_checksum,
    verify_zip,
)

DAYS = ("2020-01-01", "2020-01-02", "2020-01-03")
PREFIX = "data/spot/daily/klines/BTCUSDT/1m"
NO_WAIT = FetchPolicy(attempts=3, backoff_base_s=0.0, backoff_cap_s=0.0)
WAIT_S = 60
CUT = 0  # queued instead of a status: the connection is cut half-way through the body


def shared_spot() -> Path:
    return binance_data_dir() / "klines_1m_daily_dump" / "spot"


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the folder; answers the next statuses queued for a path first (a flaky
    archive), and logs every path asked for."""

    requests: list[str]
    queued: dict[str, list[int]]

    def do_GET(self) -> None:
        self.requests.append(self.path)
        statuses = self.queued.get(self.path)
        if statuses:
            status = statuses.pop(0)
            if status == CUT:  # half the body, then the connection closes
                data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2])
                self.close_connection = True
            else:
                self.send_error(status)
            return
        super().do_GET()

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@contextlib.contextmanager
def archive_server(root: Path) -> Iterator[tuple[str, type[_Handler]]]:
    """An HTTP server for ``root`` on 127.0.0.1, port 0; yields its URL and handler class."""
    handler = type(
        "Handler",
        (_Handler,),
        {"requests": [], "queued": {}, "__init__": _init_for(root)},
    )
    with serving(handler) as url:
        yield url, handler


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> Iterator[str]:
    """A threaded HTTP server of ``handler`` on 127.0.0.1, port 0; yields its URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _init_for(root: Path) -> object:
    def __init__(self: _Handler, *args: object, **kwargs: object) -> None:
        http.server.SimpleHTTPRequestHandler.__init__(
            self,
            *args,  # type: ignore[arg-type]
            directory=str(root),
            **kwargs,  # type: ignore[arg-type]
        )

    return __init__


def archive_root(tmp_path: Path) -> Path:
    """The shared spot days in the archive's URL layout (symlinks: read in place)."""
    root = tmp_path / "archive"
    folder = root / PREFIX
    folder.mkdir(parents=True)
    for day in DAYS:
        for suffix in (".zip", ".zip.CHECKSUM"):
            name = f"BTCUSDT-1m-{day}{suffix}"
            (folder / name).symlink_to(shared_spot() / name)
    return root


def spot_days(first: str = DAYS[0], last: str = DAYS[-1]) -> list[ArchiveDay]:
    return archive_days(
        "spot", "BTCUSDT", "1m", date.fromisoformat(first), date.fromisoformat(last)
    )


async def fetch(base: str, out: Path, days: list[ArchiveDay], **kw: bool) -> str:
    report = io.StringIO()
    with trio.fail_after(WAIT_S):
        await fetch_days(days, out, base_url=base, policy=NO_WAIT, report=report, **kw)
    return report.getvalue()


def replace_with(path: Path, data: bytes) -> None:
    path.unlink()
    path.write_bytes(data)


# --- the pure parts ------------------------------------------------------------------


def test_urls_follow_the_archive_layout() -> None:
    day = ArchiveDay("um", "BTCUSDT", "5m", date(2025, 7, 6))
    assert day.url("https://data.binance.vision/") == (
        "https://data.binance.vision/data/futures/um/daily/klines/BTCUSDT/5m/"
        "BTCUSDT-5m-2025-07-06.zip"
    )
    assert [d.day.day for d in spot_days()] == [1, 2, 3]


@pytest.mark.parametrize(
    ("symbol", "interval", "first", "last", "expected"),
    [
        ("btcusdt", "1m", "2020-01-01", "2020-01-01", "SYMBOL: 'btcusdt'"),
        ("BTCUSDT", "7m", "2020-01-01", "2020-01-01", "INTERVAL: '7m'"),
        ("BTCUSDT", "1m", "2020-01-02", "2020-01-01", "--to: 2020-01-01 is before --from"),
        ("BTCUSDT", "1m", "2000-01-01", "2020-01-01", "--from/--to: 7306 days"),
    ],
)
def test_bad_arguments_are_refused(
    symbol: str, interval: str, first: str, last: str, expected: str
) -> None:
    with pytest.raises(ArchiveError, match=f"^{expected}"):
        archive_days("spot", symbol, interval, date.fromisoformat(first), date.fromisoformat(last))


def test_checksum_files_are_read_as_binance_writes_them() -> None:
    text = (shared_spot() / "BTCUSDT-1m-2020-01-01.zip.CHECKSUM").read_text()
    digest = parse_checksum(text, "BTCUSDT-1m-2020-01-01.zip", "x")
    assert (
        digest
        == hashlib.sha256((shared_spot() / "BTCUSDT-1m-2020-01-01.zip").read_bytes()).hexdigest()
    )
    with pytest.raises(ArchiveError, match=r"^x: the checksum is for 'BTCUSDT-1m-2020-01-01\.zip'"):
        parse_checksum(text, "BTCUSDT-1m-2020-01-02.zip", "x")
    with pytest.raises(ArchiveError, match=r"^x: not a SHA-256 checksum file"):
        parse_checksum("<html>not found</html>", "a.zip", "x")


# --- downloads from a real HTTP server ---------------------------------------------------


async def test_downloads_are_verified_and_laid_out_like_the_shared_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with archive_server(archive_root(tmp_path)) as (base, handler):
        report = await fetch(base, out, spot_days(), extract=True)
        assert len(handler.requests) == 6  # a .CHECKSUM and a zip per day
    assert report.count("downloaded, SHA-256 verified") == 3
    for day in DAYS:
        for suffix in (".zip", ".zip.CHECKSUM", ".csv"):
            name = f"BTCUSDT-1m-{day}{suffix}"
            assert (out / name).read_bytes() == (shared_spot() / name).read_bytes(), name
        verify_zip(out / f"BTCUSDT-1m-{day}.zip", out / f"BTCUSDT-1m-{day}.zip.CHECKSUM")
    assert sorted(p.name for p in out.iterdir() if p.name.endswith(".part")) == []


async def test_a_rerun_fetches_only_what_is_missing_or_damaged(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with archive_server(archive_root(tmp_path)) as (base, handler):
        await fetch(base, out, spot_days(DAYS[0], DAYS[1]))
        handler.requests.clear()
        report = await fetch(base, out, spot_days())
        # only the third day is asked for; the first two are verified on disk
        assert handler.requests == [
            f"/{PREFIX}/BTCUSDT-1m-{DAYS[2]}.zip.CHECKSUM",
            f"/{PREFIX}/BTCUSDT-1m-{DAYS[2]}.zip",
        ]
        assert report.count("already present, SHA-256 verified") == 2
        # a local copy damaged since is fetched again
        damaged = out / f"BTCUSDT-1m-{DAYS[0]}.zip"
        damaged.write_bytes(damaged.read_bytes()[:-10])
        handler.requests.clear()
        await fetch(base, out, spot_days())
        assert len(handler.requests) == 2
    assert damaged.read_bytes() == (shared_spot() / damaged.name).read_bytes()


@pytest.mark.parametrize("damage", ["corrupt zip", "truncated zip", "wrong checksum"])
async def test_a_file_that_fails_its_checksum_is_refused_and_nothing_is_kept(
    tmp_path: Path, damage: str
) -> None:
    root = archive_root(tmp_path)
    name = f"BTCUSDT-1m-{DAYS[1]}.zip"
    original = (shared_spot() / name).read_bytes()
    if damage == "corrupt zip":
        flipped = bytearray(original)
        flipped[len(flipped) // 2] ^= 0xFF
        replace_with(root / PREFIX / name, bytes(flipped))
    elif damage == "truncated zip":
        replace_with(root / PREFIX / name, original[: len(original) // 2])
    else:
        replace_with(root / PREFIX / (name + ".CHECKSUM"), f"{'0' * 64}  {name}\n".encode())
    out = tmp_path / "out"
    with archive_server(root) as (base, _), pytest.raises(ArchiveError) as refused:
        await fetch(base, out, spot_days(), extract=True)
    message = str(refused.value)
    assert message.startswith(f"{base}/{PREFIX}/{name}: SHA-256 "), message
    assert "does not match its .CHECKSUM" in message and message.endswith("nothing kept")
    # the day before stays; nothing of the refused day (no zip, .CHECKSUM, CSV or .part)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"BTCUSDT-1m-{DAYS[0]}{s}" for s in (".zip", ".zip.CHECKSUM", ".csv")
    )


async def test_server_errors_are_retried_and_a_missing_day_is_named(tmp_path: Path) -> None:
    out = tmp_path / "out"
    zip_path = f"/{PREFIX}/BTCUSDT-1m-{DAYS[0]}.zip"
    with archive_server(archive_root(tmp_path)) as (base, handler):
        # a server error, then a connection cut mid-body: the third attempt succeeds
        handler.queued[zip_path] = [503, CUT]
        await fetch(base, out, spot_days(DAYS[0], DAYS[0]))
        assert handler.requests.count(zip_path) == 3
        assert (out / f"BTCUSDT-1m-{DAYS[0]}.zip").read_bytes() == (
            shared_spot() / f"BTCUSDT-1m-{DAYS[0]}.zip"
        ).read_bytes()
        handler.queued[zip_path + ".CHECKSUM"] = [503, 503, 503]
        (out / f"BTCUSDT-1m-{DAYS[0]}.zip").unlink()
        with pytest.raises(ArchiveError) as gave_up:
            await fetch(base, out, spot_days(DAYS[0], DAYS[0]))
        assert str(gave_up.value) == (
            f"{base}{zip_path}.CHECKSUM: HTTP 503 (gave up after 3 attempts)"
        )
        with pytest.raises(ArchiveError) as missing:
            await fetch(base, out, spot_days("2020-01-04", "2020-01-04"))
    assert str(missing.value) == (
        f"{base}/{PREFIX}/BTCUSDT-1m-2020-01-04.zip.CHECKSUM: not in the archive (HTTP 404)"
    )


async def test_an_unreachable_server_is_a_clear_error(tmp_path: Path) -> None:
    (listener,) = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listener.socket.getsockname()[1]
    await listener.aclose()  # nothing listens there now
    with pytest.raises(ArchiveError) as failed:
        await fetch(f"http://127.0.0.1:{port}", tmp_path / "out", spot_days())
    message = str(failed.value)
    assert message.startswith(
        f"http://127.0.0.1:{port}/{PREFIX}/BTCUSDT-1m-{DAYS[0]}.zip.CHECKSUM: cannot reach it: "
        "ConnectError"
    ), message
    assert message.endswith("(gave up after 3 attempts)")
    assert list((tmp_path / "out").iterdir()) == []


# --- the command, in a subprocess ----------------------------------------------------------


FETCH = (sys.executable, "-m", "tradecanvas", "fetch-archive")


async def run_fetch(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
    with trio.fail_after(WAIT_S):
        done = await trio.run_process(
            [*FETCH, *args], env=env, capture_stdout=True, capture_stderr=True, check=False
        )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


@pytest.mark.e2e
async def test_the_command_fetches_joins_and_reruns_without_downloading(tmp_path: Path) -> None:
    out, joined = tmp_path / "out", tmp_path / "joined" / "BTCUSDT-1m-3days.csv"
    args = ("BTCUSDT", "1m", "--from", DAYS[0], "--to", DAYS[-1], "--out", str(out))
    with archive_server(archive_root(tmp_path)) as (base, handler):
        code, stdout, stderr = await run_fetch(*args, "--base-url", base, "--csv", str(joined))
        assert code == ExitCode.OK, stderr
        assert "3 files (3 days) in" in stdout and "3 downloaded, 0 already present" in stdout
        assert f"{joined}: 4,320 candles from 3 files" in stdout
        expected = [c for d in DAYS for c in read_kline_csv(shared_spot() / f"BTCUSDT-1m-{d}.csv")]
        got = read_kline_csv(joined)
        assert len(got) == 4320
        assert all(g.same_values(e) for g, e in zip(got, expected, strict=True))
        assert joined.read_text().startswith("open_time,open,high,low,close,volume\n1577836800000,")
        handler.requests.clear()
        code, stdout, _ = await run_fetch(*args, "--base-url", base)
        assert code == ExitCode.OK and handler.requests == []
        assert "0 downloaded, 3 already present" in stdout


@pytest.mark.e2e
async def test_the_command_exits_1_naming_the_url_and_2_for_bad_arguments(tmp_path: Path) -> None:
    code, stdout, stderr = await run_fetch(
        "BTCUSDT",
        "1m",
        "--from",
        DAYS[0],
        "--out",
        str(tmp_path),
        "--base-url",
        "http://127.0.0.1:1",
        "--attempts",
        "1",
    )
    assert code == ExitCode.FAILED and stdout == ""
    assert stderr.splitlines()[-1].startswith(
        "tradecanvas fetch-archive: http://127.0.0.1:1/data/spot/daily/klines/BTCUSDT/1m/"
        "BTCUSDT-1m-2020-01-01.zip.CHECKSUM: cannot reach it"
    )
    code, _, stderr = await run_fetch("BTCUSDT", "1m", "--from", "2020-13-01")
    assert code == ExitCode.USAGE and "is not a day such as 2020-01-01" in stderr
    code, _, stderr = await run_fetch("BTCUSDT", "1m", "--from", DAYS[0], "--base-url", "ftp://x")
    assert code == ExitCode.USAGE and "--base-url: 'ftp://x' is not an http(s) URL" in stderr
    assert list(await trio.Path(tmp_path).iterdir()) == []


class _StallingHandler(http.server.BaseHTTPRequestHandler):
    """Answers a zip with the first half of its body, then holds the connection until the
    test ends: an archive that stops sending in the middle of a download. The .CHECKSUM is
    served whole."""

    root: Path
    out: Path
    part_written: threading.Event
    release: threading.Event

    def do_GET(self) -> None:
        data = (self.root / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if not self.path.endswith(".zip"):
            self.wfile.write(data)
            return
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        part = self.out / (Path(self.path).name + ".part")
        # the client has the half once its .part file holds it (bounded: WAIT_S)
        for _ in range(WAIT_S * 100):
            if (part.exists() and part.stat().st_size > 0) or self.release.wait(0.01):
                break
        self.part_written.set()
        self.release.wait(WAIT_S)

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@pytest.mark.e2e
async def test_ctrl_c_during_a_download_keeps_nothing_of_it(tmp_path: Path) -> None:
    out = tmp_path / "out"
    part_written, release = threading.Event(), threading.Event()
    handler = type(
        "Stalling",
        (_StallingHandler,),
        {
            "root": archive_root(tmp_path),
            "out": out,
            "part_written": part_written,
            "release": release,
        },
    )
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
    stderr = tmp_path / "stderr"
    try:
        with stderr.open("wb") as err:
            proc = await trio.lowlevel.open_process(
                [*FETCH, "BTCUSDT", "1m", "--from", DAYS[0], "--out", str(out), "--base-url", base],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        try:
            with trio.fail_after(WAIT_S):
                await trio.to_thread.run_sync(part_written.wait)
                assert (out / f"BTCUSDT-1m-{DAYS[0]}.zip.part").exists()
                proc.send_signal(signal.SIGINT)
                assert await proc.wait() == ExitCode.INTERRUPTED
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    finally:
        release.set()
        server.shutdown()
        server.server_close()
        thread.join()
    assert stderr.read_text().splitlines()[-1] == (
        "tradecanvas fetch-archive: interrupted; the days verified before stay"
    )
    assert list(out.iterdir()) == []  # no zip, no .CHECKSUM, no .part
