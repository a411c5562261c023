"""A series listed while the daemon watches it (tests/ingest/rig.py: ``tradecanvas replay``
serving a real day cut to start at 08:33, IngestSupervisor, the REST client, a SQLite file,
IngestPipeline): the empty store's backfill finds nothing before the first minute, REST
says that minute is the series' first (``startTime`` 0), and the listing's buckets — its
1h, 4h and 1d bars — are Binance's bars of the minutes from the listing on. The same
history behind an exchange outage where the backfill began (Binance has earlier minutes)
is a late start, not a listing: those buckets get no bar (a partial sum of a bucket
Binance has more of would not be Binance's bar)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from tests.ingest.rig import Rig, ingest_rig
from tradecanvas.model import Candle
from tradecanvas.pipeline.bars import listing_key
from tradecanvas.pipeline.derive import aggregate
from tradecanvas.tools.replay import ReplayConfig, parse_file_argument
from tradecanvas.wire.kline_csv import read_kline_csv

SID = "binance:spot:BTC/USDT:1m"
DAY0 = 1577836800  # 2020-01-01 00:00 UTC
LISTED = DAY0 + (8 * 60 + 33) * 60  # 08:33
HOUR = 3600
LIVE_FROM = DAY0 + 23 * HOUR + 40 * 60


def _day(data_dir: Path, folder: Path, keep: Callable[[int], bool]) -> tuple[Path, list[Candle]]:
    """The real 2020-01-01 BTCUSDT spot day with only the minutes ``keep`` keeps (the
    archive's own lines), and those minutes."""
    source = data_dir / "klines_1m_daily_dump" / "spot" / "BTCUSDT-1m-2020-01-01.csv"
    lines = [ln for ln in source.read_text().splitlines() if keep(int(ln.split(",")[0]) // 1000)]
    cut = folder / "BTCUSDT-1m-2020-01-01.csv"
    cut.write_text("\n".join(lines) + "\n")
    return cut, read_kline_csv(cut)


@contextlib.asynccontextmanager
async def _run(tmp_path: Path, cut: Path, live_from: int, *, listing: bool) -> AsyncIterator[Rig]:
    rows = read_kline_csv(cut)
    start_at = next(i for i, c in enumerate(rows) if c.candle_time >= live_from)
    config = ReplayConfig(
        files=(parse_file_argument(f"{SID}={cut}", None),),
        start_at=start_at,
        speed=1200.0,  # 20 live minutes in a second, each with a forming frame
        forming_per_bar=1,
    )
    async with ingest_rig(
        tmp_path,
        replay=config,
        series=SID,
        initial_backfill_candles="1000",
        derived_timeframes="1h,4h,1d",
        market_forming_min_interval_ms="0",
    ) as rig:
        await rig.hub.wait_closed(SID, rows[-1].candle_time)
        # the day's last 1h bar is published with the last minute; a listing's 1d too
        await rig.hub.wait_closed(SID.replace(":1m", ":1h"), DAY0 + 23 * HOUR)
        if listing:
            await rig.hub.wait_closed(SID.replace(":1m", ":1d"), DAY0)
        yield rig


async def test_a_listing_gets_binances_bars_of_its_first_buckets(
    tmp_path: Path, data_dir: Path
) -> None:
    cut, rows = _day(data_dir, tmp_path, lambda t: t >= LISTED)
    # live from 23:40: the backfill (1000 minutes back, from 07:00) finds nothing before 08:33
    async with _run(tmp_path, cut, LIVE_FROM, listing=True) as rig:
        await _listed(rig, rows)


async def _listed(rig: Rig, rows: list[Candle]) -> None:
    assert await rig.store.get_meta(listing_key(SID)) == str(LISTED)
    by_tf = {tf: await rig.stored(SID.replace(":1m", f":{tf}")) for tf in ("1h", "4h", "1d")}
    # the listing's buckets: the sums of the minutes from 08:33 on (Binance's bars)
    assert [c.candle_time for c in by_tf["1d"]] == [DAY0]
    assert by_tf["1d"][0] == aggregate(DAY0, rows)
    before = {h: [c for c in rows if c.candle_time < DAY0 + h * HOUR] for h in (9, 12)}
    assert by_tf["4h"][0] == aggregate(DAY0 + 8 * HOUR, before[12])
    assert by_tf["1h"][0] == aggregate(DAY0 + 8 * HOUR, before[9])
    assert [c.candle_time for c in by_tf["1h"]] == [DAY0 + h * HOUR for h in range(8, 24)]
    completes = [s.complete for s in await rig.store.range(SID.replace(":1m", ":1d"), 0, 2**40)]
    assert completes == [True]  # an ordinary bar, not a gap
    assert [m for m in rig.hub.of_type("system") if m["event"] == "gap"] == []
    # forming bars of the listing day too, each the listing's minutes so far plus the forming
    # minute: it opens at the listing's open
    forming = [m["candle"] for m in rig.hub.of_type("candle_forming", SID.replace(":1m", ":1d"))]
    assert forming and {c["candle_time"] for c in forming} == {DAY0}
    assert {c["open"] for c in forming} == {float(rows[0].open)}


async def test_a_history_behind_an_exchange_outage_is_a_late_start_not_a_listing(
    tmp_path: Path, data_dir: Path
) -> None:
    """Binance has minutes before 07:00; 07:00–08:32 are missing at the exchange and the
    backfill (1000 minutes back from 23:40) began inside that hole."""
    cut, _ = _day(data_dir, tmp_path, lambda t: not DAY0 + 7 * HOUR <= t < LISTED)
    async with _run(tmp_path, cut, LIVE_FROM, listing=False) as rig:
        await _late_start(rig)


async def _late_start(rig: Rig) -> None:
    assert await rig.store.get_meta(listing_key(SID)) is None
    assert (await rig.stored(SID))[0].candle_time == LISTED
    # the buckets the history starts inside get no bar; the next ones do
    first_of = {
        tf: [c.candle_time for c in await rig.stored(SID.replace(":1m", f":{tf}"))][:1]
        for tf in ("1h", "4h", "1d")
    }
    assert first_of == {"1h": [DAY0 + 9 * HOUR], "4h": [DAY0 + 12 * HOUR], "1d": []}
    assert rig.hub.of_type("candle_forming", SID.replace(":1m", ":1d")) == []


NOON_10 = DAY0 + 12 * HOUR + 10 * 60


@contextlib.asynccontextmanager
async def _live_from_listing(
    tmp_path: Path, data_dir: Path, keep: Callable[[int], bool]
) -> AsyncIterator[tuple[Rig, list[Candle]]]:
    """The day up to 12:10 with only the minutes ``keep`` keeps, live from 08:33 — the daemon
    watched the series before that minute: its first frame is the listing's — with an hour
    of initial backfill (07:33–08:32, where Binance has nothing)."""
    cut, rows = _day(data_dir, tmp_path, lambda t: keep(t) and t < NOON_10)
    config = ReplayConfig(
        files=(parse_file_argument(f"{SID}={cut}", None),),
        start_at=next(i for i, c in enumerate(rows) if c.candle_time >= LISTED),
        speed=1200.0,
        forming_per_bar=1,
    )
    async with ingest_rig(
        tmp_path,
        replay=config,
        series=SID,
        initial_backfill_candles="60",
        derived_timeframes="1h,4h",
        market_forming_min_interval_ms="0",
    ) as rig:
        await rig.hub.wait_closed(SID, rows[-1].candle_time)
        await rig.hub.wait_closed(SID.replace(":1m", ":1h"), DAY0 + 11 * HOUR)
        yield rig, [c for c in rows if c.candle_time >= LISTED]


async def test_a_listing_watched_from_its_first_minute_gets_binances_bars(
    tmp_path: Path, data_dir: Path
) -> None:
    """The backfill before the first live minute found nothing at all (the review's case:
    the listing was never asked about, and its 08:00 1h and 4h bars were never made)."""
    async with _live_from_listing(tmp_path, data_dir, lambda t: t >= LISTED) as (rig, rows):
        assert await rig.store.get_meta(listing_key(SID)) == str(LISTED)
        h1 = await rig.stored(SID.replace(":1m", ":1h"))
        h4 = await rig.stored(SID.replace(":1m", ":4h"))
    assert [c.candle_time for c in h1] == [DAY0 + h * HOUR for h in range(8, 12)]
    assert h1[0] == aggregate(DAY0 + 8 * HOUR, [c for c in rows if c.candle_time < DAY0 + 9 * HOUR])
    assert [c.candle_time for c in h4] == [DAY0 + 8 * HOUR]
    assert h4[0] == aggregate(
        DAY0 + 8 * HOUR, [c for c in rows if c.candle_time < DAY0 + 12 * HOUR]
    )


async def test_a_first_minute_after_an_outage_is_not_taken_for_a_listing(
    tmp_path: Path, data_dir: Path
) -> None:
    """The same empty backfill, but Binance has minutes before the outage (until 01:00):
    a late start, and the buckets it starts inside get no bar."""
    keep = lambda t: t < DAY0 + HOUR or t >= LISTED  # noqa: E731
    async with _live_from_listing(tmp_path, data_dir, keep) as (rig, _):
        assert await rig.store.get_meta(listing_key(SID)) is None
        h1 = [c.candle_time for c in await rig.stored(SID.replace(":1m", ":1h"))]
        h4 = await rig.stored(SID.replace(":1m", ":4h"))
    assert h1 == [DAY0 + h * HOUR for h in range(9, 12)] and h4 == []
