"""A client that drops its connection (a reset, no close handshake) while the daemon publishes
to it (soak finding: three INFO lines, one of them ``legacy publish failed``, and a count in
``tradecanvas_publish_failed_steps_total``). A client leaving is no publish failure: one INFO
line says it went away, naming its peer, and no publish path — legacy (kill-switch 0),
pipeline (1), the strict HTTP one — reports, counts or raises for it.

A real Hub and /ws/market on 127.0.0.1, a real SQLite store, real client sockets.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Final

import pytest
import trio
import trio_websocket

from tests.serve.test_ws_server import (
    SERIES_1M,
    SID_1M,
    SID_5M,
    Market,
    closed_times,
    connect,
    real_candles,
    running_market,
    send,
    subscribe_msg,
    until_pong,
)
from tests.serve.test_ws_server import (
    store as store,
)
from tradecanvas.ingest.publish import publish_pipeline_result_from_ws
from tradecanvas.model import Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline, PipelineResult
from tradecanvas.store.sqlite import CandleStore

PATHS: Final = ("legacy", "pipeline", "http")


async def _subscribe_then_reset(market: Market) -> str:
    """A client that subscribes to the 1m series, then resets its TCP connection (SO_LINGER
    0: an RST, no close frame) — a killed browser, a phone off the network. Its peer."""
    before = set(market.hub.subscribers())
    stream = await trio.open_tcp_stream("127.0.0.1", market.port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/ws/market")
            await send(ws, subscribe_msg(SID_1M, batch=True))
            await until_pong(ws)
            (gone,) = set(market.hub.subscribers()) - before
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()
    return gone.peer


def _publish(path: str, pipeline: IngestPipeline, result: PipelineResult, market: Market) -> int:
    """Publish ``result`` by ``path``; the failed steps (a strict path raises for one)."""
    if path == "http":
        return pipeline.publish(result, best_effort=False)
    return publish_pipeline_result_from_ws(
        result,
        pipeline=pipeline,
        hub=market.hub,
        metrics=market.metrics,
        enable_pipeline_publish=path == "pipeline",
    )


def _failed_steps(metrics: Metrics, path: str) -> float:
    value = metrics.registry.get_sample_value(
        "tradecanvas_publish_failed_steps_total", {"path": path}
    )
    return value or 0.0


@pytest.mark.parametrize("path", PATHS)
async def test_a_client_that_resets_its_connection_is_one_info_line_and_no_publish_failure(
    store: CandleStore, caplog: pytest.LogCaptureFixture, path: str
) -> None:
    minutes = real_candles()[:15]
    async with running_market(store) as market, connect(market.port) as healthy:
        await send(healthy, subscribe_msg(SID_1M, batch=True))
        await send(healthy, subscribe_msg(SID_5M, batch=True))
        assert await until_pong(healthy) == []
        pipeline = IngestPipeline(store, market.hub, [Timeframe.parse("5m")], "test")
        caplog.set_level(logging.INFO, logger="tradecanvas")
        failed = 0
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[:5], "ws"))
        failed += _publish(path, pipeline, result, market)
        peer = await _subscribe_then_reset(market)
        # at once, while the reset may still be on its way: the daemon publishes to it
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[5:10], "ws"))
        failed += _publish(path, pipeline, result, market)
        await market.hub.wait_subscribers(1)
        # and after its session ended
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[10:], "ws"))
        failed += _publish(path, pipeline, result, market)

        assert failed == 0
        assert _failed_steps(market.metrics, path) == 0.0
        lines = [
            r.getMessage()
            for r in caplog.records
            if r.name.startswith("tradecanvas") and r.levelno >= logging.INFO
        ]
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"subscriber {peer} went away: "), lines
        gone = sum(
            market.metrics.registry.get_sample_value(
                "tradecanvas_subscriber_disconnects_total", {"reason": reason}
            )
            or 0.0
            for reason in ("connection_lost", "send_failed")
        )
        assert gone == 1.0  # counted where clients leaving are counted
        # the healthy subscriber got every candle of every publish
        messages = await until_pong(healthy)
        assert closed_times(messages, SID_1M) == [c.candle_time for c in minutes]
        assert closed_times(messages, SID_5M) == [c.candle_time for c in real_candles("5m")[:3]]
