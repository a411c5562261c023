"""The roles (issue 15, DESIGN §10): what ``market_runtime_builder`` wires per role, an edge's
/readyz following Redis, and end to end: ``tradecanvas replay`` as Binance →
``tradecanvas serve --role ingest`` → real Redis → two ``tradecanvas serve --role edge``, all
on one shared store (a PostgreSQL database of the test's own, or one SQLite file).

A subscriber on each edge gets every 1m and 5m closed candle exactly once, in order, equal
to Binance's bars; a subscriber that leaves one edge and resumes on the other with ``since``
gets exactly what it missed; a strict HTTP write on one edge reaches the subscribers of both
edges once (its pipeline publishes to the bus only)."""

from __future__ import annotations

import functools
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio

from tests.bus.conftest import PrivateRedis
from tests.bus.roles_rig import (
    BARS,
    BASE,
    FIVE,
    HISTORY_BARS,
    OBJ,
    TOKEN,
    WAIT_S,
    metric,
    metrics_text,
    same,
    source,
    wait_for,
)
from tests.cli_rig import cli_env, run_cli, wait_for_line
from tests.recording_subscriber import Subscriber
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.daemon import market_runtime_builder, run_daemon
from tradecanvas.model import Candle
from tradecanvas.runtime_flags import RuntimeFlags, build_runtime_flags


def _flags(tmp_path: Path, role: str, redis_url: str) -> RuntimeFlags:
    return build_runtime_flags(
        {
            "TRADE_CANVAS_ROLE": role,
            "TRADE_CANVAS_REDIS_URL": redis_url,
            "TRADE_CANVAS_DB_PATH": str(tmp_path / "m.sqlite3"),
            "TRADE_CANVAS_WS_PORT": "0",
            "TRADE_CANVAS_HTTP_PORT": "0",
            "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m",
            # nothing answers there: the ingest's connections only retry
            "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": "ws://127.0.0.1:9",
            "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": "http://127.0.0.1:9",
        }
    ).flags


async def test_what_each_role_runs(tmp_path: Path) -> None:
    url = "redis://127.0.0.1:9/0"  # not connected to: nothing runs here
    ingest = await market_runtime_builder(_flags(tmp_path, "ingest", url))
    try:
        assert ingest.own_hub is None and ingest.own_market is None and ingest.edge_feed is None
        assert ingest.bus_publisher is not None
        assert ingest.pipeline.target is ingest.bus_publisher
        assert ingest.supervisor.hub is ingest.bus_publisher
    finally:
        await ingest.store.aclose()
    edge = await market_runtime_builder(_flags(tmp_path, "edge", url))
    try:
        assert edge.ingest is None and edge.edge_feed is not None
        # the strict write path publishes to the bus only: the hub hears it from the feed
        assert edge.pipeline.target is edge.bus_publisher
        assert edge.market.hub is edge.hub
        with pytest.raises(LookupError):
            edge.supervisor  # noqa: B018
    finally:
        await edge.store.aclose()
    single = await market_runtime_builder(_flags(tmp_path, "all", url))
    try:
        assert single.bus_publisher is None and single.edge_feed is None
        assert single.pipeline.target is single.hub
    finally:
        await single.store.aclose()


async def test_an_edge_is_not_ready_while_redis_is_down(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    await private_redis.start()
    runtime = await market_runtime_builder(_flags(tmp_path, "edge", private_redis.url))
    feed = runtime.edge_feed
    assert feed is not None
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(functools.partial(run_daemon, runtime, stop=stop))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['http']}") as client:
            with trio.fail_after(WAIT_S):
                await feed.wait_connected()
                await feed.ingest_report.wait_read()
            ready = await client.get("/readyz")
            assert ready.status_code == 200, ready.text
            assert ready.json()["ingest"] is None  # no ingest node holds the lease
            metrics = (await client.get("/metrics")).text
            assert 'tradecanvas_dependency_up{dependency="redis_feed"} 1.0' in metrics
            assert 'tradecanvas_role_info{role="edge"} 1.0' in metrics
            private_redis.stop()
            with trio.fail_after(WAIT_S):
                await feed.wait_connected(False)
            down = await client.get("/readyz")
            metrics = (await client.get("/metrics")).text
            assert 'tradecanvas_dependency_up{dependency="redis_feed"} 0.0' in metrics
            assert 'tradecanvas_dependency_up{dependency="store"} 1.0' in metrics
            assert down.status_code == 503
            assert down.json()["checks"]["bus_feed_connected"] is False
            assert down.json()["checks"]["store_open"] is True
            await private_redis.start()
            with trio.fail_after(WAIT_S):
                await feed.wait_connected()
            assert (await client.get("/readyz")).status_code == 200
        stop.set()
    await runtime.store.aclose()


@pytest.fixture(params=["postgresql", "sqlite"])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The store every process opens: TRADE_CANVAS_DATABASE_URL, or one SQLite file."""
    if request.param == "postgresql":
        return {"TRADE_CANVAS_DATABASE_URL": request.getfixturevalue("pg_url")}
    return {"TRADE_CANVAS_DB_PATH": str(tmp_path / "shared.sqlite3")}


@pytest.mark.e2e
@pytest.mark.parametrize("publish_path", ["1", "0"], ids=["pipeline", "legacy"])
async def test_one_ingest_two_edges(
    tmp_path: Path,
    redis_url: str,
    keys: StreamKeys,
    shared_store: dict[str, str],
    publish_path: str,
) -> None:
    data = source(tmp_path)
    csv, minutes, fives = data.csv, data.minutes, data.fives

    replay_log = tmp_path / "replay.log"
    with run_cli(
        ["replay", str(csv), "--port", "0", "--speed", "max", "--paused",
         "--start-at", str(HISTORY_BARS)],
        cli_env(),
        replay_log,
    ) as replay:  # fmt: skip
        found = await wait_for_line(replay_log, r"replay ws=(\S+) rest=(\S+)", replay)
        env = cli_env(
            TRADE_CANVAS_REDIS_URL=redis_url,
            TRADE_CANVAS_BUS_PREFIX=keys.prefix,
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=found.group(1),
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=found.group(2),
            TRADE_CANVAS_INITIAL_BACKFILL_CANDLES=str(HISTORY_BARS),
            TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
            TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH=publish_path,
            TRADE_CANVAS_INGEST_TOKEN=TOKEN,
            **shared_store,
        )
        ready = r"tradecanvas ready ws=(\S+) http=(\S+)"
        with run_cli(["serve", "--role", "ingest"], env, tmp_path / "ingest.log") as ingest:
            # started one after the other: each migrates the shared store at start-up
            ingest_http = (await wait_for_line(tmp_path / "ingest.log", ready, ingest)).group(2)
            with (
                run_cli(["serve", "--role", "edge"], env, tmp_path / "edge-a.log") as edge_a,
            ):
                a = await wait_for_line(tmp_path / "edge-a.log", ready, edge_a)
                with run_cli(["serve", "--role", "edge"], env, tmp_path / "edge-b.log") as edge_b:
                    b = await wait_for_line(tmp_path / "edge-b.log", ready, edge_b)
                    await _check_edges(
                        replay, minutes, fives, ingest_http, (a.group(1), a.group(2)),
                        (b.group(1), b.group(2)),
                    )  # fmt: skip
                    for proc in (edge_b, edge_a, ingest):
                        proc.send_signal(signal.SIGTERM)
                        assert await trio.to_thread.run_sync(proc.wait) == 0


async def _write(http: str, t: int) -> None:
    """A closed 1m candle through the strict HTTP write path."""
    candle = {"candle_time": t, "open": 1, "high": 2, "low": 1, "close": 2, "volume": 3}
    async with httpx.AsyncClient(base_url=http) as client:
        answer = await client.post(
            "/api/market/ingest/candle_closed",
            json={"series_id": BASE, "candle": candle},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert answer.status_code == 200, answer.text


def _has(sub: Subscriber, series: str, t: int) -> Callable[[], bool]:
    return lambda: t in sub.times(series)


async def _readyz(http: str) -> OBJ:
    async with httpx.AsyncClient(base_url=http) as client:
        doc = (await client.get("/readyz")).json()
    assert isinstance(doc, dict)
    return doc


async def _reported_connected(http: str) -> bool:
    ingest = (await _readyz(http)).get("ingest")
    return isinstance(ingest, dict) and ingest["upstream_connected"] is True


async def _check_edges(
    replay: subprocess.Popen[bytes],
    minutes: list[Candle],
    fives: list[Candle],
    ingest_http: str,
    edge_a: tuple[str, str],
    edge_b: tuple[str, str],
) -> None:
    both = [{"type": "subscribe", "series_id": s, "since": 0} for s in (BASE, FIVE)]
    on_a, on_b, mover = Subscriber(), Subscriber(), Subscriber()
    halfway = minutes[BARS // 2].candle_time
    async with trio.open_nursery() as nursery:
        await nursery.start(on_a.run, edge_a[0], both)
        await nursery.start(on_b.run, edge_b[0], both)
        await nursery.start(mover.run, edge_a[0], both[:1])
        replay.send_signal(signal.SIGUSR1)  # the replay streams now

        # the mover leaves edge A half-way and resumes on edge B with since
        assert await mover.wait_until(
            lambda: bool(mover.times(BASE)) and mover.times(BASE)[-1] >= halfway, WAIT_S
        )
        mover.scope.cancel()
        # a message it was already handed may still be recorded: read the cursor once it left
        await mover.finished.wait()
        left_at = mover.times(BASE)[-1]
        resumed = Subscriber()
        since = [{"type": "subscribe", "series_id": BASE, "since": left_at}]
        await nursery.start(resumed.run, edge_b[0], since)

        last, last5 = minutes[-1].candle_time, fives[-1].candle_time
        for sub in (on_a, on_b):
            assert await sub.wait_until(_has(sub, BASE, last), WAIT_S)
            assert await sub.wait_until(_has(sub, FIVE, last5), WAIT_S)
        assert await resumed.wait_until(lambda: last in resumed.times(BASE), WAIT_S)
        for sub in (on_a, on_b):
            assert same(sub.closed(BASE), minutes), sub.times(BASE)
            assert same(sub.closed(FIVE), fives), sub.times(FIVE)
            assert not [m for m in sub.messages if m["type"] in ("gap", "error")]
        assert same(mover.closed(BASE) + resumed.closed(BASE), minutes)

        # the strict write path on edge B: through its pipeline to the bus, then to both edges
        written = last + 60
        await _write(edge_b[1], written)
        for sub in (on_a, on_b):
            assert await sub.wait_until(_has(sub, BASE, written), WAIT_S)
        # the edge that took the write delivered it once, as the other one did; a second
        # write behind it shows nothing else was on its way
        await _write(edge_a[1], written + 60)
        for sub in (on_a, on_b):
            assert await sub.wait_until(_has(sub, BASE, written + 60), WAIT_S)
            assert sub.times(BASE) == [m.candle_time for m in minutes] + [written, written + 60]

        for http, dependency in (
            (ingest_http, "bus_publisher_connected"),
            (edge_a[1], "bus_feed_connected"),
            (edge_b[1], "bus_feed_connected"),
        ):
            doc = await _readyz(http)
            assert doc["checks"][dependency] is True, doc
        # the edges show what the lease holder says of Binance (bus/ingest_report.py)
        ingest = await _readyz(ingest_http)
        assert "ingest" not in ingest and ingest["checks"]["upstream_connected"] is True
        for _, edge_http in (edge_a, edge_b):
            # the report is renewed every third of the lease's TTL, read every second
            shown = functools.partial(_reported_connected, edge_http)
            await wait_for(shown, f"{edge_http} /readyz ingest")
            assert "upstream_connected" not in (await _readyz(edge_http))["checks"]
            # the edge times its deliveries from the bus read (docs/operations.md)
            timed = metric(
                await metrics_text(edge_http), "tradecanvas_delivery_latency_seconds_count"
            )
            assert timed is not None and timed > 0
        nursery.cancel_scope.cancel()
