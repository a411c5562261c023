"""``tradecanvas fetch-archive`` against a hostile archive on 127.0.0.1 (the rig of
``test_archive_fetch.py``): zip bombs and oversized bodies with matching checksums, encoded
responses, rows ``import`` refuses, and ``.part`` files that are links or someone else's."""

from __future__ import annotations

import contextlib
import gzip
import http.server
import os
from collections.abc import Callable, Iterator
from datetime import date
from pathlib import Path

import pytest

from tests.tools.test_archive_fetch import (
    NO_WAIT,
    PREFIX,
    archive_root,
    archive_server,
    fetch,
    run_fetch,
    serving,
    shared_spot,
    spot_days,
)
from tests.tools.zips import DAILY_1M_BOUND, DAY_NAME, T0, bomb, day_rows, put_zip, row
from tradecanvas.errors import ExitCode
from tradecanvas.tools.archive_fetch import fetch_days, write_joined_csv
from tradecanvas.tools.archive_layout import ArchiveDay, ArchiveError, archive_days

MIB = 1 << 20
# the bound on a daily 1m zip: its CSV's, a thousandth more, and 64 KiB of headers
DAILY_1M_ZIP_BOUND = DAILY_1M_BOUND + DAILY_1M_BOUND // 1000 + 64 * 1024
ZIP = f"/{PREFIX}/{DAY_NAME}.zip"


def one_day() -> list[ArchiveDay]:
    return spot_days("2020-01-01", "2020-01-01")


async def test_a_zip_bomb_with_a_matching_checksum_is_refused_and_nothing_kept(
    tmp_path: Path,
) -> None:
    root = tmp_path / "archive"
    bomb(root / PREFIX / f"{DAY_NAME}.zip", f"{DAY_NAME}.csv", 8 * MIB)
    out = tmp_path / "out"
    with archive_server(root) as (base, _), pytest.raises(ArchiveError) as refused:
        await fetch(base, out, one_day(), extract=True)
    assert str(refused.value) == (
        f"{base}{ZIP}: {out}/{DAY_NAME}.zip.part: {DAY_NAME}.csv declares 8,388,608 bytes;"
        f" a file of its kind holds at most {DAILY_1M_BOUND:,} (a zip bomb?): not read;"
        " nothing kept"
    )
    assert list(out.iterdir()) == []  # no zip, .CHECKSUM, CSV or .part


@pytest.mark.parametrize(
    ("suffix", "size", "bound"),
    [("", 1 * MIB, DAILY_1M_ZIP_BOUND), (".CHECKSUM", 5000, 4096)],
)
async def test_a_content_length_past_the_bound_is_refused_unread(
    tmp_path: Path, suffix: str, size: int, bound: int
) -> None:
    root = tmp_path / "archive"
    put_zip(root / PREFIX / f"{DAY_NAME}.zip", {f"{DAY_NAME}.csv": day_rows()})
    (root / PREFIX / f"{DAY_NAME}.zip{suffix}").write_bytes(b"0" * size)
    out = tmp_path / "out"
    with archive_server(root) as (base, _), pytest.raises(ArchiveError) as refused:
        await fetch(base, out, one_day())
    assert str(refused.value) == (
        f"{base}{ZIP}{suffix}: {size:,} bytes (Content-Length); a file of its kind is at most"
        f" {bound:,}: not read"
    )
    assert list(out.iterdir()) == []


class _Endless(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (by path) whole; any other path as ``total`` zero bytes without a
    Content-Length (the body ends when the connection does), counting what the client
    took. ``gzipped``: every file gzip-encoded, whatever the client asked for."""

    total = 64 * MIB
    files: dict[str, bytes]
    sent: list[int]
    asked: list[str]
    gzipped = False

    def do_GET(self) -> None:
        self.asked.append(self.headers.get("accept-encoding", ""))
        self.send_response(200)
        data = self.files.get(self.path)
        if data is not None:
            if self.gzipped:
                data = gzip.compress(data)
                self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            return
        self.end_headers()
        chunk, done = b"0" * 65536, 0
        with contextlib.suppress(OSError):
            while done < self.total:
                self.wfile.write(chunk)
                done += len(chunk)
        self.sent.append(done)
        self.close_connection = True

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass


@contextlib.contextmanager
def endless_server(
    files: dict[str, bytes], *, gzipped: bool = False
) -> Iterator[tuple[str, type[_Endless]]]:
    handler = type(
        "Endless", (_Endless,), {"files": files, "sent": [], "asked": [], "gzipped": gzipped}
    )
    with serving(handler) as url:
        yield url, handler


def real_file(suffix: str) -> bytes:
    return (shared_spot() / f"{DAY_NAME}.zip{suffix}").read_bytes()


@pytest.mark.parametrize(("endless", "bound"), [(".CHECKSUM", 4096), ("", DAILY_1M_ZIP_BOUND)])
async def test_a_body_that_grows_past_the_bound_is_cut(
    tmp_path: Path, endless: str, bound: int
) -> None:
    served = {f"{ZIP}.CHECKSUM": real_file(".CHECKSUM")} if endless == "" else {}
    out = tmp_path / "out"
    with endless_server(served) as (base, handler), pytest.raises(ArchiveError) as cut:
        await fetch_days(one_day(), out, base_url=base, policy=NO_WAIT)
    assert str(cut.value) == (
        f"{base}{ZIP}{endless}: the body grew past {bound:,} bytes, the most a file of its"
        " kind holds: cut, nothing kept"
    )
    # the server could not send its 64 MiB: the client hung up (socket buffers took some)
    assert len(handler.sent) == 1 and handler.sent[0] < 16 * MIB, handler.sent
    assert list(out.iterdir()) == []


async def test_an_encoded_response_is_refused_and_identity_asked_for(tmp_path: Path) -> None:
    served = {ZIP + s: real_file(s) for s in ("", ".CHECKSUM")}
    out = tmp_path / "out"
    with (
        endless_server(served, gzipped=True) as (base, handler),
        pytest.raises(ArchiveError) as refused,
    ):
        await fetch_days(one_day(), out, base_url=base, policy=NO_WAIT)
    assert str(refused.value) == (
        f"{base}{ZIP}.CHECKSUM: sent with Content-Encoding 'gzip' though asked for none; not read"
    )
    assert handler.asked == ["identity"]
    assert list(out.iterdir()) == []


# --- .part files ---------------------------------------------------------------------------


@pytest.mark.parametrize("part", [".zip.part", ".zip.CHECKSUM.part", ".csv.part", "joined"])
async def test_a_part_file_that_is_a_link_is_refused_and_its_target_untouched(
    tmp_path: Path, part: str
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    out = tmp_path / "out"
    out.mkdir()
    joined = tmp_path / "joined.csv"
    link = joined.with_name("joined.csv.part") if part == "joined" else out / f"{DAY_NAME}{part}"
    link.symlink_to(victim)
    with archive_server(archive_root(tmp_path)) as (base, _):
        if part == "joined":
            fetched = await fetch_days(one_day(), out, base_url=base, policy=NO_WAIT)
            with pytest.raises(ArchiveError) as no:
                write_joined_csv(fetched, joined)
        else:
            with pytest.raises(ArchiveError) as no:
                await fetch_days(one_day(), out, base_url=base, policy=NO_WAIT, extract=True)
    assert (
        str(no.value) == f"{link} is there and is a symbolic link: not written through; remove it"
    )
    assert victim.read_text() == "precious\n"
    assert link.is_symlink()  # left as it was found
    assert not joined.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
async def test_a_part_file_of_another_user_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    theirs = out / f"{DAY_NAME}.zip.part"
    theirs.write_text("theirs\n")
    os.chown(theirs, 65534, 65534)
    with archive_server(archive_root(tmp_path)) as (base, _), pytest.raises(ArchiveError) as no:
        await fetch_days(one_day(), out, base_url=base, policy=NO_WAIT)
    assert (
        str(no.value) == f"{theirs} is there and is not a file of ours: not written through;"
        " remove it"
    )
    assert theirs.read_text() == "theirs\n"


# --- --csv: every row checked as import checks it ------------------------------------------


def _bad_open_time(lines: list[str]) -> None:
    lines[2] = "1x77923200000" + lines[2][13:]


def _formula(lines: list[str]) -> None:
    fields = lines[2].split(",")
    fields[1] = '=HYPERLINK("http://evil.example/")'
    lines[2] = ",".join(fields)


def _outside_the_day(lines: list[str]) -> None:
    lines[2] = row(T0 + 86_400).rstrip("\n")


def _a_5m_close(lines: list[str]) -> None:
    lines[2] = row(T0 + 120, minutes=5).rstrip("\n")


@pytest.mark.parametrize(
    ("spoil", "why"),
    [
        (_bad_open_time, "open time '1x77923200000' is not an integer"),
        (_formula, "a field is not a number"),
        (_outside_the_day, "open time 1577923200000 is outside the period the file name gives"),
        (_a_5m_close, "close time 1577837219999 is not one minute after open time"),
    ],
)
async def test_a_bad_row_fails_the_joined_csv_naming_file_and_line(
    tmp_path: Path, spoil: Callable[[list[str]], None], why: str
) -> None:
    root = tmp_path / "archive"
    lines = day_rows(5).splitlines()
    spoil(lines)
    put_zip(root / PREFIX / f"{DAY_NAME}.zip", {f"{DAY_NAME}.csv": "\n".join(lines) + "\n"})
    out, joined = tmp_path / "out", tmp_path / "joined.csv"
    with archive_server(root) as (base, _):
        fetched = await fetch_days(one_day(), out, base_url=base, policy=NO_WAIT)
    with pytest.raises(ArchiveError) as refused:
        write_joined_csv(fetched, joined)
    assert str(refused.value).startswith(f"{out}/{DAY_NAME}.zip: {DAY_NAME}.csv line 3: {why}"), (
        refused.value
    )
    assert str(refused.value).endswith(f"; {joined} not written")
    assert not joined.exists() and not joined.with_name("joined.csv.part").exists()


async def test_a_file_that_is_not_utf8_fails_the_joined_csv(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    lines = day_rows(5).encode().splitlines(keepends=True)
    lines[3] = lines[3].replace(b"1.5", b"1\xe95", 1)
    put_zip(root / PREFIX / f"{DAY_NAME}.zip", {f"{DAY_NAME}.csv": b"".join(lines)})
    out, joined = tmp_path / "out", tmp_path / "joined.csv"
    with archive_server(root) as (base, _):
        fetched = await fetch_days(one_day(), out, base_url=base, policy=NO_WAIT)
    with pytest.raises(ArchiveError) as refused:
        write_joined_csv(fetched, joined)
    assert str(refused.value) == (
        f"{out}/{DAY_NAME}.zip: {DAY_NAME}.csv line 4: not UTF-8 text; {joined} not written"
    )
    assert not joined.exists()


async def test_other_intervals_are_joined_and_checked_for_their_own_bars(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    folder = root / "data/spot/daily/klines/BTCUSDT/5m"
    bars = [row(T0 + 300 * i, minutes=5) for i in range(288)]
    put_zip(folder / "BTCUSDT-5m-2020-01-01.zip", {"BTCUSDT-5m-2020-01-01.csv": "".join(bars)})
    bars = [row(T0 + 86_400 + 300 * i, minutes=5) for i in range(288)]
    bars[7] = row(T0 + 86_400 + 300 * 7)  # a 1m bar in a 5m file
    put_zip(folder / "BTCUSDT-5m-2020-01-02.zip", {"BTCUSDT-5m-2020-01-02.csv": "".join(bars)})
    first, second = archive_days("spot", "BTCUSDT", "5m", date(2020, 1, 1), date(2020, 1, 2))
    out = tmp_path / "out"
    with archive_server(root) as (base, _):
        good = await fetch_days([first], out, base_url=base, policy=NO_WAIT)
        bad = await fetch_days([second], out, base_url=base, policy=NO_WAIT)
    assert write_joined_csv(good, tmp_path / "good.csv") == 288
    lines = (tmp_path / "good.csv").read_text().splitlines()
    assert lines[1] == "1577836800000,1.5,1.5,1.5,1.5,2"
    assert lines[-1].startswith("1577922900000,")  # 23:55
    why = "line 8: close time 1577925359999 is not one 5m bar after open time 1577925300000"
    with pytest.raises(ArchiveError, match=rf"BTCUSDT-5m-2020-01-02\.csv {why} \(not a 5m kline\)"):
        write_joined_csv(good + bad, tmp_path / "bad.csv")


@pytest.mark.e2e
async def test_the_command_exits_1_on_a_bad_row_and_writes_no_csv(tmp_path: Path) -> None:
    root = tmp_path / "archive"
    lines = day_rows(5).splitlines()
    _formula(lines)
    put_zip(root / PREFIX / f"{DAY_NAME}.zip", {f"{DAY_NAME}.csv": "\n".join(lines) + "\n"})
    out, joined = tmp_path / "out", tmp_path / "joined.csv"
    with archive_server(root) as (base, _):
        code, _, stderr = await run_fetch(
            "BTCUSDT", "1m", "--from", "2020-01-01", "--out", str(out), "--base-url", base,
            "--csv", str(joined),
        )  # fmt: skip
    assert code == ExitCode.FAILED
    assert stderr.splitlines()[-1] == (
        f"tradecanvas fetch-archive: {out}/{DAY_NAME}.zip: {DAY_NAME}.csv line 3: a field is"
        f" not a number; {joined} not written"
    )
    assert not joined.exists()
