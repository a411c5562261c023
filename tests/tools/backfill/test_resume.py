"""``tradecanvas backfill`` resumes from the store and a second run changes nothing: pages the
store holds whole are not fetched again, each exchange hole is recorded once, and the holes
after the last candle are listed. Binance is ``tradecanvas replay`` in this process; the
store is real SQLite. (The interruption itself, by SIGINT, is in ``test_cli``.)"""

from __future__ import annotations

from pathlib import Path

import attrs

from tests.store_pg.conftest import pg_url  # noqa: F401 (the fixture: a fresh database)
from tests.tools.backfill.test_cli import (
    BASE,
    WEEK,
    binance_replay,
    csv_rows,
    import_in_process,
    replay_config,
    same_bars,
    stored,
    table_dump,
)
from tradecanvas.errors import ExitCode
from tradecanvas.store.open import open_store
from tradecanvas.store.sqlite import CandleStore

WEEK_1M = "BTCUSDT-1m-2025-07-06_2025-07-12.csv"
MINUTES = 3100  # three futures pages (derived 5m only): 1500, 1500, 100 minutes


async def test_an_interrupted_import_continues_where_it_stopped(tmp_path: Path) -> None:
    """The first run stops after its first page (here: its range ends there); the same
    command then fetches only the pages the store does not hold."""
    rows = csv_rows(WEEK_1M)
    db = tmp_path / "market.sqlite3"
    async with binance_replay(replay_config(WEEK_1M, start_at=MINUTES)) as replay:
        first = await import_in_process(db, replay.rest_url, str(WEEK), str(WEEK + 1500 * 60))
        assert first.code == ExitCode.OK and replay.statistics().rest_requests == 1
        again = await import_in_process(db, replay.rest_url, str(WEEK), str(WEEK + MINUTES * 60))
        assert replay.statistics().rest_requests == 3  # pages 2 and 3 only
    tally = again.tally
    assert (again.code, tally.pages_skipped, tally.pages_fetched) == (ExitCode.OK, 1, 2)
    assert (tally.fetched, tally.new, tally.unchanged) == (1600, 1600, 1500)
    assert "resumed: 1,500 minutes in 1 pages were stored already and not fetched again" in (
        tally.summary_lines()
    )
    assert same_bars(await stored(db, BASE), rows[:MINUTES])


async def test_a_second_run_over_exchange_holes_records_each_hole_once(tmp_path: Path) -> None:
    """Minutes 100..102 are missing at the exchange: the page holding them is fetched again
    (the store cannot tell a hole from a minute not fetched yet), the others are not, and
    the hole's gap event is not written twice."""
    db = tmp_path / "market.sqlite3"
    config = replay_config(WEEK_1M, start_at=MINUTES, exchange_holes=((100, 3),))
    async with binance_replay(config) as replay:
        first = await import_in_process(db, replay.rest_url, str(WEEK), None)
        assert first.code == ExitCode.OK and first.tally.holes_recorded == 1
        before = table_dump(db)
        second = await import_in_process(db, replay.rest_url, str(WEEK), None)
        assert replay.statistics().rest_requests == 3 + 1
    tally = second.tally
    assert (second.code, tally.pages_fetched, tally.pages_skipped) == (ExitCode.OK, 1, 2)
    assert (tally.stored, tally.holes_recorded, tally.missing) == (0, 0, 3)
    lines = tally.summary_lines()
    assert "holes at the exchange (0 new gap events): 2025-07-06T01:40Z..2025-07-06T01:42Z (3)" in (
        lines
    )
    assert lines[-1].startswith("nothing changed: the store already held every candle")
    assert table_dump(db) == before  # candles, events and meta: nothing written


async def test_minutes_missing_after_the_last_candle_are_listed_not_recorded(
    tmp_path: Path,
) -> None:
    """The last 5 minutes of the range are missing at the exchange: there is no candle above
    them to record a gap with (the daemon's repair or the next backfill records it when one
    is stored), but the summary lists them."""
    db = tmp_path / "market.sqlite3"
    config = replay_config(WEEK_1M, start_at=MINUTES, exchange_holes=((MINUTES - 5, 5),))
    async with binance_replay(config) as replay:
        first = await import_in_process(db, replay.rest_url, str(WEEK), None)
        before = table_dump(db)
        second = await import_in_process(db, replay.rest_url, str(WEEK), None)
        assert replay.statistics().rest_requests == 3 + 1  # the last page again
    assert first.code == ExitCode.OK and first.tally.holes_recorded == 0
    assert first.tally.holes() == {
        "before": [],
        "holes": [],
        "after": [(WEEK + (MINUTES - 5) * 60, WEEK + (MINUTES - 1) * 60)],
    }
    assert (
        "missing after the last candle (a gap once a candle above is stored):"
        " 2025-07-08T03:35Z..2025-07-08T03:39Z (5)" in first.tally.summary_lines()
    )
    assert second.code == ExitCode.OK and table_dump(db) == before
    assert second.tally.summary_lines()[-1].startswith("nothing changed")


async def test_refetch_fetches_every_page_and_takes_binance_revisions(tmp_path: Path) -> None:
    """A page stored whole is skipped, even if a stored candle differs from Binance's (as if
    Binance revised it since); ``--refetch`` asks for every page again and stores the
    revision."""
    rows = csv_rows(WEEK_1M)
    db = tmp_path / "market.sqlite3"
    async with binance_replay(replay_config(WEEK_1M, start_at=MINUTES)) as replay:
        await import_in_process(db, replay.rest_url, str(WEEK), None)
        store = await CandleStore.open(db)
        try:
            await store.upsert(BASE, [attrs.evolve(rows[7], volume=rows[7].volume + 1)], "http")
        finally:
            await store.aclose()
        skipped = await import_in_process(db, replay.rest_url, str(WEEK), None)
        assert skipped.tally.pages_fetched == 0 and skipped.tally.revised == 0
        refetched = await import_in_process(db, replay.rest_url, str(WEEK), None, refetch=True)
        assert replay.statistics().rest_requests == 3 + 3
    assert refetched.tally.pages_fetched == 3
    assert (refetched.tally.revised, refetched.tally.new) == (1, 0)
    assert same_bars(await stored(db, BASE), rows[:MINUTES])


async def test_resume_and_a_second_run_on_postgresql(
    tmp_path: Path,
    pg_url: str,  # noqa: F811 (the fixture imported above)
) -> None:
    """The same on the PostgreSQL store: what the store holds decides which pages are
    fetched, and a second run changes nothing."""
    rows = csv_rows(WEEK_1M)
    db = tmp_path / "unused.sqlite3"
    config = replay_config(WEEK_1M, start_at=MINUTES, exchange_holes=((2000, 2),))
    async with binance_replay(config) as replay:
        url = replay.rest_url
        half_way = str(WEEK + 1500 * 60)
        half = await import_in_process(
            db, url, str(WEEK), half_way, TRADE_CANVAS_DATABASE_URL=pg_url
        )
        rest = await import_in_process(db, url, str(WEEK), None, TRADE_CANVAS_DATABASE_URL=pg_url)
        again = await import_in_process(db, url, str(WEEK), None, TRADE_CANVAS_DATABASE_URL=pg_url)
        assert replay.statistics().rest_requests == 1 + 2 + 1  # the hole's page again
    assert half.code == rest.code == again.code == ExitCode.OK
    assert (rest.tally.pages_skipped, rest.tally.new, rest.tally.holes_recorded) == (1, 1598, 1)
    assert (again.tally.stored, again.tally.holes_recorded, again.tally.pages_skipped) == (0, 0, 2)
    assert again.tally.summary_lines()[-1].startswith("nothing changed")
    store = await open_store(pg_url)
    try:
        got = await store.range(BASE, 0, 2**40)
        gaps = [e for e in await store.events_after(0, [BASE]) if e.event == "gap"]
    finally:
        await store.aclose()
    assert same_bars(got, rows[:2000] + rows[2002:MINUTES])
    assert [(e.data["from_time"], e.data["to_time"]) for e in gaps] == [
        (WEEK + 2000 * 60, WEEK + 2001 * 60)
    ]
    assert not db.exists()
