"""Issue 17 item 6, distributed: Redis and PostgreSQL restart mid-stream under a running
``tradecanvas serve --role ingest`` and ``--role edge`` (real subprocesses), while
``tradecanvas replay`` streams 4 symbols of closed 1m candles.

- Redis: a private ``redis-server`` (nothing kept on disk) is killed and started again:
  every stream and the ingest lease are lost with it, as in a restart without persistence.
- PostgreSQL: a TCP proxy in front of the test's own database is cut (every connection
  closed, new ones refused) and restored, as a server restart looks to its clients.

The shared services are never restarted. The faults are a seeded mix of the two, each
starting when a seeded number of closed candles has reached the subscriber and lasting until
both roles noticed it (``/readyz`` false) and then until both recovered (``/readyz``
true). A subscriber on the edge stays connected throughout: it gets every candle once, in
order, equal to the source, and every stored event once; the store ends holding every candle
once, equal to the source.

Sizes: ``make test`` 4 × 400 candles and 2 faults (one of each); ``make soak`` 4 × 2,500
and 20.
"""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest
import trio

from tests.bus.cluster import Node, wait_ready
from tests.bus.conftest import PrivateRedis
from tests.cli_rig import children
from tests.reliability.distributed import check_pg_stored, role_env, start_role, stop_nodes
from tests.reliability.record import ReliabilityRecord, report, sized
from tests.reliability.rig import (
    START,
    Subscriber,
    check_resumed,
    csv_files,
    market_files,
    start_replay,
)
from tests.store_pg.proxy import TcpProxy

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 1713


async def restart_redis(redis: PrivateRedis, ingest: Node, edge: Node) -> None:
    redis.stop()
    await wait_ready(ingest, "bus_publisher_connected", False)
    await wait_ready(edge, "bus_feed_connected", False)
    await redis.start()
    await wait_ready(ingest, "bus_publisher_connected", True)
    await wait_ready(edge, "bus_feed_connected", True)


async def restart_postgresql(proxy: TcpProxy, ingest: Node, edge: Node) -> None:
    proxy.cut()
    for node in (ingest, edge):
        await wait_ready(node, "store_reachable", False)
    proxy.restore()
    for node in (ingest, edge):
        await wait_ready(node, "store_reachable", True)


async def test_redis_and_postgresql_restarts_lose_and_double_nothing(
    tmp_path: Path, private_redis: PrivateRedis, pg_url: str
) -> None:
    count = sized(400, 2500)
    faults = sized(2, 20)
    source = market_files(tmp_path, SEED, count)
    series = sorted(source)
    total = len(series) * count
    rng = random.Random(SEED)
    kinds = ["redis", "postgresql"] * (faults // 2)
    rng.shuffle(kinds)
    # in the first three quarters of the stream: each fault lands while candles still flow
    thresholds = sorted(rng.sample(range(1, total * 3 // 4), faults))
    # the stream lasts about as long as the faults take (a few seconds each)
    speed = str(count * 60 // (10 + 5 * faults))
    sub = Subscriber(series, START)
    proxy = TcpProxy(pg_url)
    await private_redis.start()
    with children() as kids:
        async with trio.open_nursery() as outer:
            await outer.start(proxy.run)
            replay, ws, rest = await start_replay(
                kids, tmp_path, csv_files(tmp_path), "--speed", speed, "--paused"
            )
            env = role_env(
                tmp_path,
                ws,
                rest,
                series,
                database_url=proxy.url,
                redis_url=private_redis.url,
                prefix="tcreliability:",
            )
            ingest = await start_role(kids, tmp_path, "ingest", env)
            edge = await start_role(kids, tmp_path, "edge", env)
            await outer.start(sub.session, edge.ws)
            replay.send_signal(signal.SIGUSR1)  # the stream starts
            for kind, goal in zip(kinds, thresholds, strict=True):
                await sub.wait_until(lambda g=goal: sub.total() >= g)  # type: ignore[misc]
                assert sub.total() < total, "the stream ended before the fault"
                if kind == "redis":
                    await restart_redis(private_redis, ingest, edge)
                else:
                    await restart_postgresql(proxy, ingest, edge)
            await sub.wait_until(lambda: sub.total() >= total)
            assert sub.close_code is None  # the subscriber never noticed
            await stop_nodes(edge, ingest)
            outer.cancel_scope.cancel()

    lost, dup = check_resumed(sub, source)
    assert len(sub.sessions) == 1
    stored = check_pg_stored(pg_url, sub, source)
    ingest_log = (tmp_path / "ingest.log").read_text()
    if "postgresql" in kinds:
        assert "unreachable" in ingest_log and "answers again" in ingest_log
    if "redis" in kinds:
        assert "bus publisher: Redis failed" in ingest_log
    report(
        ReliabilityRecord(
            test="distributed_restarts",
            seed=SEED,
            faults=faults,
            attempted=total,
            stored=stored,
            delivered=sub.total(),
            lost=lost,
            duplicated=dup,
        )
    )
