"""Poisoned upstream frames over a real socket: a fake Binance WebSocket speaking Binance's
combined-stream kline frames, REST from a replay of the real 2023-08-16 day, the real
store and pipeline. A frame of the year 2100 (its E, or its bar) and a frame of another
symbol than its stream's are counted and logged as malformed; nothing is stored, published
or fetched because of them, and no ``gap`` appears (hostile-input review, D1–D3)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from tests.ingest.rig import BTC, WAIT_S, day_rows, frame, ingest_rig, metric, same_bars
from tests.ingest.test_frame_bounds import with_data
from tests.upstream.test_binance_ws import ScriptedUpstream, real_time_limit
from tradecanvas.model import Candle
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, parse_file_argument, serve_replay

YEAR_2100 = 4_102_444_800


def _closed(bar: Candle) -> str:
    return frame(bar, closed=True, event_time_ms=bar.candle_time * 1000 + 60_100)


async def test_poisoned_frames_change_nothing(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with real_time_limit(WAIT_S):
        await _poisoned_scenario(tmp_path, data_dir, caplog)


async def _poisoned_scenario(
    tmp_path: Path, data_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = day_rows(data_dir)
    bars = rows[600:604]
    t2 = bars[2].candle_time
    far = Candle(YEAR_2100, bars[2].open, bars[2].high, bars[2].low, bars[2].close, bars[2].volume)
    prices = dict.fromkeys(("k_o", "k_h", "k_l", "k_c"), "2500.00")
    poisons = [
        # D1: a forming frame whose event time is 2100
        with_data(
            frame(bars[2], closed=False, event_time_ms=t2 * 1000 + 30_000), E=YEAR_2100 * 1000
        ),
        # D2: a closed bar of 2100, its T and E consistent
        frame(far, closed=True, event_time_ms=YEAR_2100 * 1000 + 60_050),
        # D3: btcusdt@kline_1m carrying ETHUSDT
        with_data(_closed(bars[2]), s="ETHUSDT", k_s="ETHUSDT", **prices),
    ]
    upstream = ScriptedUpstream()
    csv = data_dir / "klines_1m_5m" / "futures_um" / "BTCUSDT-1m-2023-08-16.csv"
    history = ReplayConfig(files=(parse_file_argument(str(csv), None, stream=False),))
    caplog.set_level(logging.WARNING, logger="tradecanvas.ingest.loop")
    async with trio.open_nursery() as nursery:
        rest: ReplayHandle = await nursery.start(serve_replay, history)
        ws_url = await upstream.start(nursery)
        async with ingest_rig(
            tmp_path, ws_url=ws_url, rest_url=rest.rest_url, market_forming_min_interval_ms="0"
        ) as rig:
            for bar in bars[:2]:
                await upstream.send.send(_closed(bar))
            for raw in poisons:
                await upstream.send.send(raw)
            for bar in bars[2:]:  # after the poisons on the same socket: read after them
                await upstream.send.send(_closed(bar))
            await rig.hub.wait_closed(str(BTC), bars[-1].candle_time)
            assert same_bars(await rig.stored(str(BTC)), bars)
            published = rig.hub.messages
            times = [
                c["candle_time"]
                for m in published
                for c in (m.get("candles") or [m.get("candle") or {}])
                if "candle_time" in c
            ]
            assert times and max(times) < YEAR_2100
            assert [m for m in published if m.get("event") == "gap"] == []
            assert rig.hub.closed_times(str(BTC)) == [b.candle_time for b in bars]
            assert rest.statistics().rest_requests == 0  # no fill: no minute was late
            count = "tradecanvas_malformed_frames_total"
            assert metric(rig, count, reason="ahead_of_clock") == 2
            assert metric(rig, count, reason="symbol_mismatch") == 1
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert any("(ahead_of_clock)" in w and "2100-01-01" in w for w in warnings)
            assert any("(symbol_mismatch)" in w and "ETHUSDT" in w for w in warnings)
        nursery.cancel_scope.cancel()
