"""The wiring of ``market_runtime_builder``: one store, hub and pipeline shared by every
path; /ws/market on both ports by one endpoint; the kill-switch reaching
``run_binance_ws_ingest_loop``; the HTTP path strict; only runtime_flags reading the
environment. Real parts: the replay stands in for Binance."""

from __future__ import annotations

import ast
import functools
import resource
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
import trio_websocket

from tests.conftest import binance_data_dir
from tests.serve.test_ws_server import connect, until_pong
from tradecanvas.daemon import MarketRuntime, market_runtime_builder, run_daemon
from tradecanvas.ingest.supervisor import IngestSupervisor
from tradecanvas.model import Candle
from tradecanvas.pipeline.commit import IngestPipeline, PipelineResult
from tradecanvas.runtime_flags import RuntimeFlags, build_runtime_flags
from tradecanvas.serve.event_tail import OwnWrites
from tradecanvas.serve.shedding import RESERVED_DESCRIPTORS
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, parse_file_argument, serve_replay
from tradecanvas.wire.json import dumps, loads

WEEK = "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
BASE = "binance:futures:BTC/USDT:1m"
TOKEN = "architecture-test-token-0123"
HTTP_TIME = 60 * 10**7  # 1989, far before the replayed data: only the HTTP write stores it


async def post_candle(client: httpx.AsyncClient, t: int) -> httpx.Response:
    """The strict write path, with the token."""
    candle = {"candle_time": t, "open": 1, "high": 1, "low": 1, "close": 1, "volume": 1}
    return await client.post(
        "/api/market/ingest/candle_closed",
        json={"series_id": BASE, "candle": candle},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )


def _flags(tmp_path: Path, replay: ReplayHandle, kill_switch: str) -> RuntimeFlags:
    return build_runtime_flags(
        {
            "TRADE_CANVAS_DB_PATH": str(tmp_path / "m.sqlite3"),
            "TRADE_CANVAS_WS_PORT": "0",
            "TRADE_CANVAS_HTTP_PORT": "0",
            "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": replay.ws_url,
            "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": replay.rest_url,
            "TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH": kill_switch,
            "TRADE_CANVAS_INITIAL_BACKFILL_CANDLES": "60",
            "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m",
            "TRADE_CANVAS_INGEST_TOKEN": TOKEN,
        }
    ).flags


@asynccontextmanager
async def running_daemon(
    tmp_path: Path, kill_switch: str
) -> AsyncIterator[tuple[MarketRuntime, dict[str, int]]]:
    path = binance_data_dir() / WEEK
    config = ReplayConfig(files=(parse_file_argument(str(path), "futures"),), start_at=60)
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        runtime = await market_runtime_builder(_flags(tmp_path, replay, kill_switch))
        stop = trio.Event()
        async with trio.open_nursery() as daemon:
            ports = await daemon.start(functools.partial(run_daemon, runtime, stop=stop))
            try:
                yield runtime, ports
            finally:
                stop.set()  # the daemon's own shutdown path, bounded by its drain deadline
        nursery.cancel_scope.cancel()
    await runtime.store.aclose()


async def test_one_store_hub_and_pipeline_shared_by_every_path(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, "0") as (runtime, ports):
        assert isinstance(runtime.pipeline, IngestPipeline)
        # the one store (seen through the event tail, which notes the pipeline's event ids)
        assert isinstance(runtime.pipeline.store, OwnWrites)
        assert runtime.pipeline.store.inner is runtime.store
        assert runtime.pipeline.target is runtime.hub
        assert isinstance(runtime.supervisor, IngestSupervisor)
        assert runtime.supervisor.pipeline is runtime.pipeline
        assert runtime.supervisor.hub is runtime.hub
        assert runtime.supervisor.flags is runtime.flags
        assert set(ports) == {"ws", "http"}
        # the HTTP write path runs through the same pipeline instance
        runs_before = runtime.pipeline.statistics().runs
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['http']}") as client:
            answer = await post_candle(client, HTTP_TIME)
        assert answer.status_code == 200, answer.text
        assert runtime.pipeline.statistics().runs == runs_before + 1
        # stored (the replayed minutes may be committed already: they are the head then)
        stored = await runtime.store.range(BASE, HTTP_TIME, HTTP_TIME + 60)
        assert [s.candle.candle_time for s in stored] == [HTTP_TIME]


async def test_ws_market_on_both_ports_by_one_endpoint(tmp_path: Path) -> None:
    """A subscriber on the WS port and one on the HTTP port: the same hub, the same
    candles, both counted and both closed with 1001 when the daemon stops."""
    ports_used = ("ws", "http")
    codes: dict[str, int | None] = {}
    received: dict[str, list[int]] = {name: [] for name in ports_used}
    subscribed = {name: trio.Event() for name in ports_used}
    got_it = {name: trio.Event() for name in ports_used}
    async with trio.open_nursery() as clients:
        async with running_daemon(tmp_path, "1") as (runtime, ports):

            async def subscriber(name: str) -> None:
                async with connect(ports[name]) as ws:
                    subscribe = {"type": "subscribe", "series_id": BASE, "since": HTTP_TIME - 60}
                    await ws.send_message(dumps(subscribe | {"supports_batch": True}))
                    await until_pong(ws)
                    subscribed[name].set()
                    try:
                        while True:
                            message = loads(await ws.get_message())
                            if message["type"] == "candles_batch":
                                received[name] += [c["candle_time"] for c in message["candles"]]
                                got_it[name].set()
                    except trio_websocket.ConnectionClosed as exc:
                        codes[name] = exc.reason.code if exc.reason is not None else None

            for name in ports_used:
                clients.start_soon(subscriber, name)
            with trio.fail_after(10):
                for event in subscribed.values():
                    await event.wait()
            assert runtime.market.hub is runtime.hub
            assert runtime.hub.statistics().subscribers == 2
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['http']}") as client:
                assert (await post_candle(client, HTTP_TIME)).status_code == 200
                ready = (await client.get("/readyz")).json()
                metrics = (await client.get("/metrics")).text
                # both ports share one budget of client sockets: 2 sessions and this client
                assert runtime.client_sockets.count == 3
            assert ready["checks"]["listeners_bound"] is True
            assert "tradecanvas_subscribers 2.0" in metrics
            # the session on the HTTP port is not one of its plain connections
            assert "tradecanvas_http_connections 1.0" in metrics
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
            assert runtime.client_sockets.limit == soft - RESERVED_DESCRIPTORS
            with trio.fail_after(10):
                for event in got_it.values():
                    await event.wait()
            began = trio.current_time()
        took = trio.current_time() - began  # the daemon's own shutdown path ran
    for times in received.values():
        # in order, once each: the HTTP write (unless the replay's later candles were
        # committed before the subscription, which puts it below the cursor) and the replay's
        assert times and times == sorted(set(times))
    # the same hub, the same stream (one may have got a last batch the other had not yet,
    # and, as above, only one of them the HTTP write)
    replayed = {name: [t for t in times if t != HTTP_TIME] for name, times in received.items()}
    shorter = min(len(replayed["ws"]), len(replayed["http"]))
    assert replayed["ws"][:shorter] == replayed["http"][:shorter]
    assert codes == {"ws": 1001, "http": 1001}
    assert took < 10
    shutdowns = runtime.metrics.subscriber_disconnects_total.labels(reason="shutdown")
    assert shutdowns._value.get() == 2


@pytest.mark.parametrize(("kill_switch", "expected"), [("0", False), ("1", True)])
async def test_kill_switch_reaches_the_ingest_loop(
    tmp_path: Path, kill_switch: str, expected: bool
) -> None:
    async with running_daemon(tmp_path, kill_switch) as (runtime, _ports):
        assert runtime.flags.enable_ingest_ws_pipeline_publish is expected
        assert runtime.supervisor.enable_pipeline_publish is expected
        publishes: list[bool] = []
        original = runtime.pipeline.publish

        def spy(result: PipelineResult, *, best_effort: bool) -> int:
            publishes.append(best_effort)
            return original(result, best_effort=best_effort)

        runtime.pipeline.publish = spy  # type: ignore[method-assign]
        # live closes reach the hub through the chosen path: wait for a few
        enough = trio.Event()
        closed_publishes: list[str] = []
        publish_closed = runtime.hub.publish_closed

        def hub_spy(series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
            closed_publishes.append(series_id)
            if len(closed_publishes) >= 6:
                enough.set()
            return publish_closed(series_id, candles)

        runtime.hub.publish_closed = hub_spy  # type: ignore[method-assign]
        with trio.fail_after(30):
            await enough.wait()
        assert runtime.supervisor.statistics().loops_enable_pipeline_publish == (expected,)
        assert runtime.status_line().startswith("upstream 1/1 connected, 1 streams; ")
        label, other = ("pipeline", "legacy") if expected else ("legacy", "pipeline")
        assert runtime.metrics.publish_total.labels(path=label)._value.get() >= 3
        assert runtime.metrics.publish_total.labels(path=other)._value.get() == 0
        if expected:
            assert publishes and all(best_effort is True for best_effort in publishes)
        else:
            assert publishes == []  # the legacy path never calls IngestPipeline.publish


async def test_http_path_is_strict(tmp_path: Path) -> None:
    async with running_daemon(tmp_path, "1") as (runtime, ports):
        calls: list[bool] = []
        original = runtime.pipeline.publish

        def spy(result: PipelineResult, *, best_effort: bool) -> int:
            if result.updates and result.updates[0].candles[0].candle_time == HTTP_TIME:
                calls.append(best_effort)
            return original(result, best_effort=best_effort)

        runtime.pipeline.publish = spy  # type: ignore[method-assign]
        async with connect(ports["ws"]) as ws:
            await ws.send_message(
                dumps(
                    {
                        "type": "subscribe",
                        "series_id": BASE,
                        "since": HTTP_TIME - 60,
                        "supports_batch": True,
                    }
                )
            )
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['http']}") as client:
                answer = await post_candle(client, HTTP_TIME)
            assert answer.status_code == 200
            with trio.fail_after(10):
                while True:
                    message: dict[str, Any] = loads(await ws.get_message())
                    if message["type"] == "candles_batch":
                        assert [c["candle_time"] for c in message["candles"]] == [HTTP_TIME]
                        break
        assert calls == [False]
        assert runtime.metrics.publish_total.labels(path="http")._value.get() == 1


def test_no_module_but_runtime_flags_reads_the_environment() -> None:
    package = Path(__file__).resolve().parent.parent / "tradecanvas"
    readers: set[str] = set()
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv", "environb"):
                readers.add(path.name)
            if isinstance(node, ast.alias) and node.name in ("environ", "getenv"):
                readers.add(path.name)
    assert readers == {"runtime_flags.py"}
