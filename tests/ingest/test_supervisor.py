"""IngestSupervisor over real sockets (tests/ingest/rig.py): exchangeInfo's rate limits,
restarts after a crash, and the store failure that stops it."""

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
from tradecanvas.pipeline.commit import IngestPipeline, PipelineResult
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.tools.replay import ReplayHandle, serve_replay
from tradecanvas.upstream.rest import RestPolicy


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
