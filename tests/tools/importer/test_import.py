"""``tradecanvas import`` in this process on real SQLite: the real archive zips, refusals,
idempotence, the one ``import`` event, overlap with live ingest, derived bars."""

from __future__ import annotations

import io
import os
import shutil
import signal
import zipfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import binance_data_dir, read_kline_csv
from tests.tools.importer.rig import (
    DAYS,
    FLAGS,
    SPOT_1M,
    SPOT_5M,
    Nobody,
    dump_dir,
    events,
    identical,
    import_into,
    plan,
    real_zips,
    rows,
)
from tradecanvas.errors import BadInputError, ExitCode
from tradecanvas.model import CLOCK_SKEW_S, SeriesId
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.store.open import open_store
from tradecanvas.tools.importer import PENDING_KEY, ArchiveCommitter, read_file, run_import
from tradecanvas.tools.importer.files import ArchiveFileError, plan_file
from tradecanvas.tools.progress import Progress
from tradecanvas.wire.archive import ARCHIVE_HEADER, parse_archive_rows

FUTURES = Path("klines_1m_5m") / "futures_um"


def copy_zips(target: Path) -> list[Path]:
    """The real zips and their .CHECKSUM files, copied to change them."""
    target.mkdir(parents=True, exist_ok=True)
    for day in DAYS:
        for suffix in (".zip", ".zip.CHECKSUM"):
            name = f"BTCUSDT-1m-{day}{suffix}"
            shutil.copyfile(dump_dir() / name, target / name)
    return sorted(target.glob("*.zip"))


async def test_real_zips_are_verified_and_equal_their_csvs_row_for_row(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    files = plan(real_zips())
    assert {str(f.series) for f in files} == {SPOT_1M}  # from the names and the spot folder
    assert all(read_file(f).checksum for f in files)
    code, tally, error = await import_into(db, files)
    assert (code, error) == (ExitCode.OK, None)
    expected = [
        c
        for day in DAYS
        for c in parse_archive_rows((dump_dir() / f"BTCUSDT-1m-{day}.csv").read_text().splitlines())
    ]
    assert len(expected) == 4320
    assert identical(await rows(db, SPOT_1M), expected)
    assert len(await rows(db, SPOT_5M)) == 864
    one = tally.series[SPOT_1M]
    assert (one.new, one.unchanged, one.revised, one.verified, one.holes) == (4320, 0, 0, 3, [])
    # one factor.rebuild per series, reason import, with the exact range
    logged = await events(db)
    by_series = {e.series_id: e.data for e in logged}
    assert len(logged) == len(by_series) == 1 + len(FLAGS.derived_timeframes)
    assert by_series[SPOT_1M] == {
        "series_id": SPOT_1M,
        "reason": "import",
        "from_time": 1_577_836_800,
        "to_time": 1_577_836_800 + 3 * 86_400 - 60,
    }
    assert by_series[SPOT_5M]["to_time"] == 1_577_836_800 + 3 * 86_400 - 300


async def test_a_second_import_changes_nothing_and_says_so(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    await import_into(db, plan(real_zips()))
    before = (await rows(db, SPOT_1M), await rows(db, SPOT_5M), await events(db))
    # the folder: the zips, not the CSVs extracted beside them
    code, tally, _ = await import_into(db, plan([dump_dir()]))
    assert code == ExitCode.OK
    assert tally.files_total == 3
    assert (await rows(db, SPOT_1M), await rows(db, SPOT_5M), await events(db)) == before
    one = tally.series[SPOT_1M]
    assert (one.new, one.unchanged, one.revised) == (0, 4320, 0)
    assert not tally.changed and tally.events == 0
    assert "nothing changed: every candle was already stored" in tally.summary_lines(0.1)


async def test_a_wrong_checksum_is_refused_and_nothing_of_the_file_stored(tmp_path: Path) -> None:
    zips = copy_zips(tmp_path / "spot")
    checksum = zips[1].with_name(zips[1].name + ".CHECKSUM")
    checksum.write_text("0" * 64 + f"  {zips[1].name}\n")
    db = tmp_path / "m.sqlite3"
    code, tally, error = await import_into(db, plan(zips), batch=1)
    assert code == ExitCode.FAILED
    assert error is not None and str(zips[1]) in error and "does not match" in error
    stored = await rows(db, SPOT_1M)
    assert len(stored) == 1440 and tally.files_done == 1  # the day before it stays
    assert {c.candle_time // 86_400 for c in stored} == {1_577_836_800 // 86_400}


async def test_a_truncated_zip_is_refused(tmp_path: Path) -> None:
    [zip_path, *_] = copy_zips(tmp_path / "spot")
    data = zip_path.read_bytes()
    zip_path.write_bytes(data[: len(data) // 2])
    zip_path.with_name(zip_path.name + ".CHECKSUM").unlink()  # else the checksum refuses it
    db = tmp_path / "m.sqlite3"
    code, _, error = await import_into(db, plan([zip_path]))
    assert code == ExitCode.FAILED
    assert error is not None and "corrupt or truncated" in error and str(zip_path) in error
    assert await rows(db, SPOT_1M) == []
    assert await events(db) == []


async def test_a_csv_with_one_bad_row_is_refused_naming_the_line(tmp_path: Path) -> None:
    lines = (dump_dir() / "BTCUSDT-1m-2020-01-02.csv").read_text().splitlines()
    lines[700] = lines[700].replace(".", ",", 1)  # one column too many
    bad = tmp_path / "spot" / "BTCUSDT-1m-2020-01-02.csv"
    bad.parent.mkdir()
    bad.write_text("\n".join(lines) + "\n")
    db = tmp_path / "m.sqlite3"
    code, _, error = await import_into(db, plan([bad]))
    assert code == ExitCode.FAILED
    assert (
        error == f"{bad}: line 701: 13 columns where the file has 12; nothing of this file stored"
    )
    assert await rows(db, SPOT_1M) == []


@pytest.mark.parametrize(
    ("column", "value", "why"),
    [
        (5, "1" + "0" * 400, "line 4: volume 1.000000E+400 is too large"),
        (8, str(2**60), f"line 4: trades {2**60} is too large"),
    ],
)
async def test_a_plain_number_too_large_is_refused_and_nothing_stored(
    tmp_path: Path, column: int, value: str, why: str
) -> None:
    # digits only, as Binance writes its numbers: the 1e30 and 2**53 bounds hold as they do
    # for 1e999 (a volume of 401 digits was stored, served as "volume": null)
    lines = (dump_dir() / "BTCUSDT-1m-2020-01-01.csv").read_text().splitlines()[:10]
    fields = lines[3].split(",")
    fields[column] = value
    lines[3] = ",".join(fields)
    bad = tmp_path / "spot" / "BTCUSDT-1m-2020-01-01.csv"
    bad.parent.mkdir()
    bad.write_text("\n".join(lines) + "\n")
    db = tmp_path / "m.sqlite3"
    code, _, error = await import_into(db, plan([bad]))
    assert code == ExitCode.FAILED
    assert error is not None and error.startswith(f"{bad}: {why}")
    assert error.endswith("; nothing of this file stored")
    assert await rows(db, SPOT_1M) == []


async def test_a_kline_that_has_not_closed_yet_is_refused_naming_the_line(
    tmp_path: Path,
) -> None:
    # rows from the future (a corrupt or hand-made file): stored, a year-3000 bar would be
    # the series' head; the file is refused at its first such row, with a clock's skew
    def write(path: Path, times: list[int]) -> Path:
        body = "".join(f"{t * 1000},1,2,1,1,5,{(t + 60) * 1000 - 1},5,1,1,1,0\n" for t in times)
        path.write_text(ARCHIVE_HEADER + "\n" + body)
        return path

    t = 1_700_000_040  # three rows: the last closes at t + 120
    planned = plan_file(
        write(tmp_path / "rows.csv", [t - 60, t, t + 60]), SeriesId.parse(SPOT_1M), None
    )
    assert len(read_file(planned, now=t + 120 - CLOCK_SKEW_S).candles) == 3
    with pytest.raises(ArchiveFileError) as refused:
        read_file(planned, now=t + 119 - CLOCK_SKEW_S)
    opens = datetime.fromtimestamp(t + 60, UTC).strftime("%Y-%m-%d %H:%M UTC")
    assert str(refused.value) == (
        f"{planned.path}: line 4: the kline opening at {opens} has not closed yet by this"
        " machine's clock; nothing of this file stored"
    )
    # through the command, by today's clock: nothing of the file stored
    future = write(tmp_path / "future.csv", [t - 60, t, 32_503_680_000])
    db = tmp_path / "m.sqlite3"
    code, _, error = await import_into(db, plan([future], series=SPOT_1M))
    assert code == ExitCode.FAILED
    assert error is not None and "line 4: the kline opening at 3000-01-01 00:00 UTC" in error
    assert await rows(db, SPOT_1M) == []


async def test_a_file_of_another_interval_is_refused(tmp_path: Path) -> None:
    five = tmp_path / "spot" / "BTCUSDT-5m-2020-01-01.csv"
    five.parent.mkdir()
    five.write_text("1577836800000,1,1,1,1,1,1577837099999,1,1,1,1,0\n")
    with pytest.raises(BadInputError, match="holds 5m klines; only 1m is imported"):
        plan([five])
    renamed = five.with_name("BTCUSDT-1m-2020-01-01.csv")
    five.rename(renamed)
    code, _, error = await import_into(tmp_path / "m.sqlite3", plan([renamed]))
    assert code == ExitCode.FAILED and error is not None and "not a 1m kline" in error


async def test_import_and_live_ingest_of_overlapping_ranges_give_one_row_per_candle(
    tmp_path: Path,
) -> None:
    db = tmp_path / "m.sqlite3"
    day = read_kline_csv(dump_dir() / "BTCUSDT-1m-2020-01-02.csv")
    series = SeriesId.parse(SPOT_1M)
    store = await open_store(db)
    try:  # the daemon's pipeline stored the last hours of day 1 and the first of day 2
        live = IngestPipeline.from_flags(store, Nobody(), FLAGS)
        day1 = read_kline_csv(dump_dir() / "BTCUSDT-1m-2020-01-01.csv")
        for candle in day1[-120:] + day[:90]:
            await live.run(IngestBatch.of(series, [candle], "ws"))
    finally:
        await store.aclose()
    code, tally, _ = await import_into(db, plan(real_zips()))
    assert code == ExitCode.OK
    stored = await rows(db, SPOT_1M)
    assert len(stored) == len({c.candle_time for c in stored}) == 4320
    assert tally.series[SPOT_1M].unchanged == 210
    assert len(await rows(db, SPOT_5M)) == 864


async def test_derived_5m_after_import_equals_binances_own_5m(tmp_path: Path) -> None:
    folder = binance_data_dir() / FUTURES
    base = "binance:futures:BTC/USDT:1m"
    db = tmp_path / "m.sqlite3"
    files = plan([folder / "BTCUSDT-1m-2025-07-06_2025-07-12.csv"], series=base)
    code, _, _ = await import_into(db, files)
    assert code == ExitCode.OK
    binance_5m = read_kline_csv(folder / "BTCUSDT-5m-2025-07-06_2025-07-12.csv")
    derived = await rows(db, "binance:futures:BTC/USDT:5m")
    assert len(derived) == len(binance_5m) == 2016
    assert all(a.same_values(b) for a, b in zip(derived, binance_5m, strict=True))


async def test_an_interrupted_import_resumes_with_one_event_for_both_runs(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    files = plan(real_zips())
    store = await open_store(db)
    try:  # the first run committed day 1, then died before its event
        committer = ArchiveCommitter(IngestPipeline.from_flags(store, Nobody(), FLAGS))
        await committer.commit(files[0].series, read_file(files[0]).candles)
        assert await store.get_meta(PENDING_KEY) is not None
        assert await store.events_after(0, None, 100) == []
    finally:
        await store.aclose()
    code, tally, _ = await import_into(db, files)
    assert code == ExitCode.OK and tally.pending_before
    assert tally.series[SPOT_1M].unchanged == 1440 and tally.series[SPOT_1M].new == 2880
    [event] = [e for e in await events(db) if e.series_id == SPOT_1M]
    assert (event.data["from_time"], event.data["to_time"]) == (
        1_577_836_800,
        1_577_836_800 + 3 * 86_400 - 60,
    )


async def test_holes_in_a_file_are_listed_as_ranges(tmp_path: Path) -> None:
    lines = (dump_dir() / "BTCUSDT-1m-2020-01-01.csv").read_text().splitlines()
    holed = tmp_path / "spot" / "BTCUSDT-1m-2020-01-01.csv"
    holed.parent.mkdir()
    holed.write_text("\n".join(lines[:600] + lines[605:1439]) + "\n")
    code, tally, _ = await import_into(tmp_path / "m.sqlite3", plan([holed]))
    assert code == ExitCode.OK
    t0 = 1_577_836_800
    assert tally.series[SPOT_1M].holes == [
        (t0 + 600 * 60, t0 + 605 * 60),
        (t0 + 86_340, t0 + 86_400),
    ]
    text = "\n".join(tally.summary_lines(1.0))
    assert "6 minutes missing in the files" in text
    assert "2020-01-01T10:00Z..2020-01-01T10:04Z (5 min), 2020-01-01T23:59Z (1 min)" in text


async def test_a_zip_with_two_csvs_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spot" / "BTCUSDT-1m-2020-01-01.zip"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("a.csv", "")
        archive.writestr("b.csv", "")
    code, _, error = await import_into(tmp_path / "m.sqlite3", plan([path]))
    assert code == ExitCode.FAILED and error is not None
    assert "holds 2 members ('a.csv', 'b.csv')" in error


class _InterruptOnFirstLine(io.StringIO):
    """A progress stream that sends this process SIGINT at the first progress line (after
    the first commit), as a user's Ctrl-C would."""

    def __init__(self) -> None:
        super().__init__()
        self.sent = False

    def write(self, text: str) -> int:
        if not self.sent and "candles" in text:
            self.sent = True
            os.kill(os.getpid(), signal.SIGINT)
        return super().write(text)


async def test_ctrl_c_stops_after_a_commit_and_the_same_command_finishes(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite3"
    files = plan(real_zips())
    progress = Progress(_InterruptOnFirstLine(), log=None, verb="import", tty=False)
    code, tally, error = await run_import(
        files, db, FLAGS.derived_timeframes, FLAGS.derivation_fingerprint(), progress, batch=1440
    )
    assert code == ExitCode.INTERRUPTED
    assert error is not None and "run the same command again" in error
    stored = len(await rows(db, SPOT_1M))
    assert 1440 <= stored < 4320 and stored % 1440 == 0  # whole transactions only
    t0 = 1_577_836_800
    # what was committed has changed the history: its event is logged as the run ends
    [first] = [e for e in await events(db) if e.series_id == SPOT_1M]
    assert (first.event, first.data["reason"]) == ("factor.rebuild", "import")
    assert (first.data["from_time"], first.data["to_time"]) == (t0, t0 + 60 * (stored - 1))
    assert tally.events == len(await events(db)) > 0
    code, tally, _ = await import_into(db, files)
    assert code == ExitCode.OK and not tally.pending_before
    assert tally.series[SPOT_1M].unchanged == stored
    assert len(await rows(db, SPOT_1M)) == 4320
    # the second run's event covers what it changed, the rest
    [_, second] = [e for e in await events(db) if e.series_id == SPOT_1M]
    assert (second.data["from_time"], second.data["to_time"]) == (
        t0 + 60 * stored,
        t0 + 3 * 86_400 - 60,
    )


@pytest.mark.parametrize(
    ("name", "symbol"),
    [("BTCUSDT", "BTC/USDT"), ("ADAUSDT", "ADA/USDT"), ("ADABTC", "ADA/BTC")],
)
async def test_derived_5m_equals_binances_on_spot_with_empty_minutes(
    tmp_path: Path, name: str, symbol: str
) -> None:
    folder = binance_data_dir() / "klines_1m_5m" / "spot_octobot"
    [one] = folder.glob(f"{name}-1m-*_octobot.csv")
    [five] = folder.glob(f"{name}-5m-*_octobot.csv")
    db = tmp_path / "m.sqlite3"
    code, _, _ = await import_into(db, plan([one], series=f"binance:spot:{symbol}:1m"))
    assert code == ExitCode.OK
    minutes = {c.candle_time for c in read_kline_csv(one)}
    # Binance's 5m bars whose five minutes are all in the 1m file
    covered = [
        b for b in read_kline_csv(five) if all(b.candle_time + 60 * i in minutes for i in range(5))
    ]
    derived = {c.candle_time: c for c in await rows(db, f"binance:spot:{symbol}:5m")}
    assert len(covered) >= 98
    assert all(derived[b.candle_time].same_values(b) for b in covered)


async def test_the_summary_counts_every_rebuild_event_it_logged(tmp_path: Path) -> None:
    """Imported again with 15m added to the derived timeframes: the fingerprint rebuild the
    import logged is counted with its import event (it said 0 while it had logged one)."""
    db = tmp_path / "m.sqlite3"
    files = plan(real_zips()[:1])
    for derived in ("5m", "5m,15m"):
        flags = build_runtime_flags({"TRADE_CANVAS_DERIVED_TIMEFRAMES": derived}).flags
        before = len(await events(db)) if db.exists() else 0
        progress = Progress(io.StringIO(), log=None, verb="import", tty=False)
        code, tally, _ = await run_import(
            files, db, flags.derived_timeframes, flags.derivation_fingerprint(), progress
        )
        assert code == ExitCode.OK
        logged = [e for e in (await events(db))[before:] if e.event == "factor.rebuild"]
        assert tally.events == len(logged)
    assert logged and {e.data["reason"] for e in logged} == {"fingerprint"}
