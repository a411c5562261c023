"""``import(export(x))`` is the identity: candles stored, exported in the archive layout and
imported into a fresh store come back the same (a hypothesis property), on real SQLite."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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
