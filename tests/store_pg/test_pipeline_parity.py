"""The IngestPipeline on both backends: a real Binance day, committed in batches, out of
order (a backfill below the head), with a revision and a hole Binance confirmed, gives the
same results, the same events (ids included) and the same stored rows on SQLite and on
PostgreSQL, and the 5m bars equal Binance's own."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import attrs

from tests.conftest import read_kline_csv
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline, PipelineResult
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import open_store

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
TFS = [Timeframe.parse(t) for t in ("5m", "15m", "1h", "4h", "1d")]
FP = "binance-exact-v1;derived=15m,1d,1h,4h,5m"


class NullTarget:
    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        return []

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        return []


def _summary(result: PipelineResult) -> object:
    return (
        [(u.series_id, [c.candle_time for c in u.candles], u.revised) for u in result.updates],
        [
            (e.series_id, e.event, e.reason, e.from_time, e.to_time, e.event_id)
            for e in result.events
        ],
        result.received,
        result.duplicates_dropped,
    )


async def _run_day(store: MarketStore, day: list[Candle]) -> tuple[list[object], list[object]]:
    pipeline = IngestPipeline(store, NullTarget(), TFS, FP, clock=lambda: 1_700_000_000.0)
    summaries: list[object] = []
    later, earlier = day[720:], day[:700]  # minutes 700..719 are "missing" for a while
    for i in range(0, len(later), 200):
        summaries.append(
            _summary(await pipeline.run(IngestBatch.of(BTC, later[i : i + 200], "ws")))
        )
    for i in range(0, len(earlier), 400):
        summaries.append(
            _summary(await pipeline.run(IngestBatch.of(BTC, earlier[i : i + 400], "rest")))
        )
    # Binance confirms 700..709 missing; 710..719 arrive; one minute is revised
    hole = IngestBatch(
        tuple((BTC, c) for c in day[710:720]),
        "rest",
        absent=((BTC, day[700].candle_time, day[710].candle_time),),
    )
    summaries.append(_summary(await pipeline.run(hole)))
    revised = attrs.evolve(
        day[900], close=day[900].close + 1, high=max(day[900].high, day[900].close + 1)
    )
    summaries.append(_summary(await pipeline.run(IngestBatch.of(BTC, [revised], "http"))))
    rows: list[object] = []
    for sid in [str(BTC), *(str(BTC.with_timeframe(tf)) for tf in TFS)]:
        stored = await store.range(sid, 0, 2**40)
        rows.append(
            [
                (s.candle.candle_time, str(s.candle.open), str(s.candle.high), str(s.candle.low),
                 str(s.candle.close), str(s.candle.volume), str(s.candle.quote_volume),
                 s.candle.trades, s.source, s.complete)
                for s in stored
            ]
        )  # fmt: skip
    events = await store.events_after(0, limit=10_000)
    rows.append([(e.event_id, e.series_id, e.event, e.data) for e in events])
    return summaries, rows


async def test_pipeline_results_and_rows_equal_on_both_backends(
    data_dir: Path, tmp_path: Path, pg_url: str
) -> None:
    folder = data_dir / "klines_1m_5m" / "futures_um"
    day = read_kline_csv(folder / "BTCUSDT-1m-2023-08-16.csv")
    assert len(day) == 1440
    sqlite = await open_store(tmp_path / "m.sqlite3")
    postgres = await open_store(pg_url)
    on_sqlite = await _run_day(sqlite, day)
    on_postgres = await _run_day(postgres, day)
    assert on_postgres[0] == on_sqlite[0]  # per-batch results and events, ids included
    assert on_postgres[1] == on_sqlite[1]  # every stored row, text included, and the log
    # the 5m bars outside the hole and the revision equal Binance's own
    binance_5m = {c.candle_time: c for c in read_kline_csv(folder / "BTCUSDT-5m-2023-08-16.csv")}
    touched = {day[700].candle_time // 300 * 300 + k * 300 for k in range(-1, 5)}
    touched.add(day[900].candle_time // 300 * 300)
    touched.add(1692200400)  # SOURCES.md: the reference 5m bar was stored while forming
    stored_5m = await postgres.range(str(BTC.with_timeframe(TFS[0])), 0, 2**40)
    checked = [s for s in stored_5m if s.candle.candle_time not in touched]
    assert len(checked) > 270
    bad = [
        (s, binance_5m[s.candle.candle_time])
        for s in checked
        if not s.candle.same_values(binance_5m[s.candle.candle_time])
    ]
    assert bad == []
    await sqlite.aclose()
    await postgres.aclose()
