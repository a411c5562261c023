"""``import(export(x))`` is the identity: candles stored, exported in the archive layout and
imported into a fresh store come back the same (a hypothesis property), on real SQLite."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.cli_rig import cli_env
from tests.tools.importer.rig import FLAGS, SPOT_1M, import_into, plan, rows
from tests.wire.test_archive import candles
from tradecanvas.errors import ExitCode
from tradecanvas.model import Candle, SeriesId
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.store.open import open_store
from tradecanvas.tools.export import export_csv
from tradecanvas.tools.importer import ArchiveCommitter


class _Nobody:
    def publish_closed(self, series_id: str, candles: object) -> tuple[str, ...]:
        return ()

    def publish_system(self, event: object) -> tuple[str, ...]:
        return ()


async def _round_trip(given: list[Candle], folder: Path, header: bool) -> None:
    series = SeriesId.parse(SPOT_1M)
    first, second = folder / "a.sqlite3", folder / "b.sqlite3"
    store = await open_store(first)
    try:
        committer = ArchiveCommitter(IngestPipeline.from_flags(store, _Nobody(), FLAGS))
        await committer.commit(series, given)
        text = io.StringIO()
        written = await export_csv(
            store, series, given[0].candle_time, given[-1].candle_time + 60, text, header=header
        )
        assert written == len(given)
    finally:
        await store.aclose()
    exported = folder / "export.csv"
    exported.write_text(text.getvalue())
    code, _, error = await import_into(second, plan([exported], series=SPOT_1M))
    assert (code, error) == (ExitCode.OK, None)
    stored_a, stored_b = await rows(first, SPOT_1M), await rows(second, SPOT_1M)
    assert stored_a == stored_b == given
    assert [(str(c.open), c.trades) for c in stored_b] == [(str(c.open), c.trades) for c in given]
    for tf in ("5m", "1h"):
        sid = f"binance:spot:BTC/USDT:{tf}"
        assert await rows(first, sid) == await rows(second, sid)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(candles(), st.booleans())
def test_import_of_export_is_the_identity(given: list[Candle], header: bool) -> None:
    with tempfile.TemporaryDirectory() as folder:
        trio.run(_round_trip, given, Path(folder), header)


def test_export_of_nothing_writes_nothing(tmp_path: Path) -> None:
    async def main() -> int:
        store = await open_store(tmp_path / "m.sqlite3")
        try:
            return await export_csv(store, SeriesId.parse(SPOT_1M), 0, 600, io.StringIO())
        finally:
            await store.aclose()

    assert trio.run(main) == 0


# the archive's own digits: zeros and prices below 1e-6 as data.binance.vision writes them
PLAIN = (
    "1577836800000,0.00000050,0.00000055,0.00000049,0.00000052,5.00000000,1577836859999,"
    "0.00000260,2,5.00000000,0.00000260,0\n"
    "1580515080000,0.00000060,0.00000061,0.00000059,0.00000060,0.00000000,1580515139999,"
    "0.00000000,0,0.00000000,0.00000000,0\n"
    "1580515140000,0.00000060,0.00000062,0.00000060,0.00000061,1250.00000000,1580515199999,"
    "0.00076250,3,600.00000000,0.00036600,0\n"
    "1580515200000,0.00000061,0.00000061,0.00000061,0.00000061,10.00000000,1580515259999,"
    "0.00000610,1,0.00000000,0.00000000,0\n"
)
SHIB = "binance:spot:SHIB/BTC"


def test_export_writes_the_archives_digits_and_month_bars(tmp_path: Path) -> None:
    """No exponent (``0E-8``, ``6.0E-7``): a file imported and exported again is the same
    bytes; a 1M series exports with each month's own close time."""
    archive = tmp_path / "shib-minutes.csv"  # no period in the name: it spans two
    archive.write_text(PLAIN)
    db = tmp_path / "m.sqlite3"
    env = cli_env(TRADE_CANVAS_DB_PATH=str(db), TRADE_CANVAS_DERIVED_TIMEFRAMES="5m,1d,1M")

    def tradecanvas(*args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tradecanvas", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    tradecanvas("import", "--series", f"{SHIB}:1m", str(archive))
    window = ("--from", "2020-01-01", "--to", "2020-03-01")
    assert tradecanvas("export", f"{SHIB}:1m", *window) == PLAIN
    months = tradecanvas("export", f"{SHIB}:1M", *window).splitlines()
    # January (its history starts on its first minute; February's bar is not due yet),
    # closing a millisecond before February
    assert [m.split(",")[:7] for m in months] == [
        ["1577836800000", "0.00000050", "0.00000062", "0.00000049", "0.00000061",
         "1255.00000000", "1580515199999"]
    ]  # fmt: skip


def test_out_through_a_link_or_into_a_fifo_is_written_never_replaced(tmp_path: Path) -> None:
    """``--out`` replaces a regular file whole; a symbolic link's file is the one replaced
    (the link stays), and a FIFO is written to (a device such as /dev/full was replaced by
    a regular file before)."""
    archive = tmp_path / "shib-minutes.csv"
    archive.write_text(PLAIN)
    env = cli_env(TRADE_CANVAS_DB_PATH=str(tmp_path / "m.sqlite3"))
    command = [sys.executable, "-m", "tradecanvas"]
    window = ["--from", "2020-01-01", "--to", "2020-03-01"]
    subprocess.run(
        [*command, "import", "--series", f"{SHIB}:1m", str(archive)],
        env=env, capture_output=True, timeout=120, check=True,
    )  # fmt: skip

    def export(out: Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*command, "export", f"{SHIB}:1m", *window, "--out", str(out)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, text=True,
        )  # fmt: skip

    real, link = tmp_path / "real.csv", tmp_path / "link.csv"
    real.write_text("old\n")
    link.symlink_to(real)
    with export(link) as done:
        assert done.wait(timeout=120) == 0
    assert link.is_symlink() and real.read_text() == PLAIN

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with export(fifo) as writer:
        with fifo.open() as reader:  # opens once the export opens it for writing
            received = reader.read()
        assert writer.wait(timeout=120) == 0
    assert received == PLAIN and stat.S_ISFIFO(fifo.lstat().st_mode)


def test_import_says_it_did_not_ask_binance_for_a_3d_grid(tmp_path: Path) -> None:
    """`import` reads files only: its warning about an unknown 3d grid said "Binance has no
    bar", as if it had asked."""
    archive = tmp_path / "shib-minutes.csv"
    archive.write_text(PLAIN)
    env = cli_env(TRADE_CANVAS_DB_PATH=str(tmp_path / "m.sqlite3"))
    done = subprocess.run(
        [sys.executable, "-m", "tradecanvas", "import", "--series", f"{SHIB}:1m",
         "--derived-timeframes", "1d,3d", str(archive)],
        env=env, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "grid phase unknown (Binance: not asked: import reads files only" in done.stderr
    assert "Binance has no bar" not in done.stderr
