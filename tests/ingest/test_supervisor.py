"""IngestSupervisor over real sockets (tests/ingest/rig.py): exchangeInfo's rate limits,
restarts after a crash, the store failure that stops it, and the 3d grid learned at start."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import trio

from tests.ingest.rig import (
    BTC,
    DAY,
    FAST,
    WAIT_S,
    RecordingHub,
    day_replay,
    day_rows,
    ingest_rig,
    make_flags,
    same_bars,
)
from tradecanvas.errors import StoreError
from tradecanvas.ingest.supervisor import IngestSupervisor
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline, PipelineResult
from tradecanvas.pipeline.derive import aggregate
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, parse_file_argument, serve_replay
from tradecanvas.upstream.rest import RestPolicy
from tradecanvas.wire.kline_csv import read_kline_csv


async def test_rate_limits_are_read_from_exchange_info_at_start(
    tmp_path: Path, data_dir: Path
) -> None:
    config = day_replay(data_dir, start_at=1430, weight_limit=1200)
    async with ingest_rig(tmp_path, replay=config) as rig:
        with trio.fail_after(WAIT_S):
            await rig.supervisor.rate_limits_loaded.wait()
        assert rig.supervisor.rest is not None
        assert rig.supervisor.rest.statistics().weight_limit == {"futures": 1200}


async def test_rate_limits_stay_at_the_usual_values_when_exchange_info_fails(
    tmp_path: Path, data_dir: Path
) -> None:
    async with ingest_rig(
        tmp_path,
        replay=day_replay(data_dir, start_at=1430),
        rest_url="http://127.0.0.1:1",  # nothing listens there
        rest_policy=RestPolicy(max_attempts=1),
    ) as rig:
        with trio.fail_after(WAIT_S):
            await rig.supervisor.rate_limits_loaded.wait()
        await rig.hub.wait_closed(str(BTC), DAY + 1439 * 60)  # the live stream goes on
        assert rig.supervisor.rest is not None
        assert rig.supervisor.rest.statistics().weight_limit == {"futures": 2400}


@pytest.mark.slow  # over a second of real time
async def test_a_crashed_loop_is_restarted_and_heals_from_the_store(
    tmp_path: Path,
    data_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    rows = day_rows(data_dir)
    config = day_replay(data_dir, start_at=1400, speed=3000.0, forming_per_bar=1)
    async with ingest_rig(tmp_path, replay=config) as rig:
        original = rig.pipeline.run
        crashed: list[bool] = []

        async def crash_once(batch: Any) -> PipelineResult:
            if not crashed and batch.candles[0][1].candle_time >= DAY + 1410 * 60:
                crashed.append(True)
                raise RuntimeError("a bug")
            return await original(batch)

        monkeypatch.setattr(rig.pipeline, "run", crash_once)
        await rig.hub.wait_closed(str(BTC), DAY + 1439 * 60)
        assert same_bars(await rig.stored(str(BTC)), rows[1400:])
        restarts = [r for r in caplog.records if "crashed; restarting" in r.getMessage()]
        assert len(restarts) == 1 and restarts[0].levelno == logging.ERROR


async def test_store_failure_stops_the_supervisor(
    tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(batch: Any) -> PipelineResult:
        raise StoreError("disk full")

    hub = RecordingHub()
    config = day_replay(data_dir, start_at=1430)
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        flags = make_flags(tmp_path, replay.ws_url, replay.rest_url)
        store = await CandleStore.open(flags.db_path)
        pipeline = IngestPipeline(store, hub, flags.derived_timeframes, "fp")
        monkeypatch.setattr(pipeline, "run", broken)
        supervisor = IngestSupervisor(
            flags, pipeline, hub, Metrics(), enable_pipeline_publish=False, policy=FAST
        )
        with trio.fail_after(WAIT_S), pytest.raises(StoreError, match="disk full"):
            await supervisor.run()
        await store.aclose()
        nursery.cancel_scope.cancel()


async def test_3d_history_is_derived_on_the_learned_grid_and_published_first(
    tmp_path: Path, data_dir: Path
) -> None:
    """With 3d configured, the supervisor asks Binance (the replay) for one 3d bar in the
    background, keeps the phase in the store, derives the 3d history and publishes it; the
    3d bars equal Binance's 1d bars summed on futures BTCUSDT's grid (day mod 3 = 2), and
    forming 3d candles go out only after them."""
    folder = data_dir / "klines_1m_5m" / "futures_um"
    week = folder / "BTCUSDT-1m-2025-07-06_2025-07-12.csv"
    minutes = read_kline_csv(week)
    days = read_kline_csv(data_dir / "klines_higher" / "futures_um" / week.name.replace("1m", "1d"))
    config = ReplayConfig(
        files=(parse_file_argument(str(week), None),), speed=None, start_at=10078, paused=True
    )
    hub = RecordingHub()
    three_d = "binance:futures:BTC/USDT:3d"
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        flags = make_flags(
            tmp_path,
            replay.ws_url,
            replay.rest_url,
            derived_timeframes="1d,3d",
            market_forming_min_interval_ms="0",
        )
        store = await CandleStore.open(flags.db_path)
        pipeline = IngestPipeline(store, hub, flags.derived_timeframes, "fp")
        await pipeline.run(IngestBatch.of(BTC, minutes[:10078], "rest"))  # up to 23:57 on 07-12
        hub.messages.clear()
        supervisor = IngestSupervisor(
            flags, pipeline, hub, Metrics(), enable_pipeline_publish=False, policy=FAST
        )
        await nursery.start(supervisor.run)
        with trio.fail_after(WAIT_S):
            await supervisor.phases_learned.wait()
        assert supervisor.phases == {BTC: 2 * 86_400}
        assert await store.get_meta(f"phase:3d:futures:{BTC.symbol}") == str(2 * 86_400)
        # 07-07..07-09 is complete; 07-10..07-12 lacks its last two minutes yet, and the
        # bucket of 07-04 started before the stored history: neither is derived yet
        assert hub.closed_times(three_d) == [days[1].candle_time]
        replay.resume()
        await hub.wait_closed(three_d, days[4].candle_time)
        stored = [s.candle for s in await store.range(three_d, 0, 2**40)]
        expected = [
            aggregate(days[1].candle_time, days[1:4]),
            aggregate(days[4].candle_time, days[4:7]),
        ]
        assert [c.candle_time for c in stored] == [days[1].candle_time, days[4].candle_time]
        assert all(a.same_values(b) for a, b in zip(stored, expected, strict=True))
        assert hub.of_type("candle_forming", three_d) and hub.overtaken() == []
        nursery.cancel_scope.cancel()
    await store.aclose()
