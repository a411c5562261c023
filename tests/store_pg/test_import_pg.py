"""``tradecanvas import`` into PostgreSQL stores the same rows and events as into SQLite."""

from __future__ import annotations

from pathlib import Path

from tests.tools.importer.rig import SPOT_1M, events, import_into, plan, real_zips, rows
from tradecanvas.errors import ExitCode


async def test_import_into_postgresql_equals_sqlite(pg_url: str, tmp_path: Path) -> None:
    lite = tmp_path / "m.sqlite3"
    files = plan(real_zips())
    for location in (lite, pg_url):
        code, tally, error = await import_into(location, files, batch=2000)
        assert (code, error) == (ExitCode.OK, None)
        assert tally.series[SPOT_1M].new == 4320
    for sid in (
        SPOT_1M,
        *(f"binance:spot:BTC/USDT:{tf}" for tf in ("5m", "15m", "1h", "4h", "1d")),
    ):
        on_pg, on_lite = await rows(pg_url, sid), await rows(lite, sid)
        assert on_pg and on_pg == on_lite
        assert [str(c.close) for c in on_pg] == [str(c.close) for c in on_lite]
    assert [(e.series_id, e.data) for e in await events(pg_url)] == [
        (e.series_id, e.data) for e in await events(lite)
    ]
    # again on PostgreSQL: nothing changes
    code, tally, _ = await import_into(pg_url, files)
    assert code == ExitCode.OK and not tally.changed and tally.series[SPOT_1M].unchanged == 4320
    assert len(await events(pg_url)) == 6
