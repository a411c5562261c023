"""Faults on running roles (issue 15 item 5): real ``serve --role ingest|edge`` subprocesses,
``tradecanvas replay`` as Binance, real Redis and PostgreSQL. Each fault lands mid-run and
each test checks that a subscriber gets every closed 1m and 5m candle exactly once, in
order, equal to Binance's (nothing lost), that /readyz is false and
``tradecanvas_dependency_up`` 0 while the dependency is down, and that the roles log it.

- Redis restarting: a private ``redis-server`` (the shared one is never restarted).
- PostgreSQL going away: a TCP proxy in front of the test's database, cut and restored (the
  shared server is never restarted).
- An edge killed while clients are connected: they resume on the other edge with ``since``
  and ``events_after`` and get exactly what they missed.
- A slow edge (SIGSTOP): its streams are trimmed meanwhile; woken, it fills from the store,
  and the other edge's subscribers never noticed.
"""

from __future__ import annotations

import contextlib
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import trio

from tests.bus.cluster import Cluster, Node, cluster, stop, wait_dependency, wait_ready
from tests.bus.conftest import PrivateRedis
from tests.bus.roles_rig import (
    BASE,
    FIVE,
    HISTORY_BARS,
    OBJ,
    WAIT_S,
    Source,
    metric,
    metrics_text,
    same,
    source,
    wait_for,
)
from tests.cli_rig import wait_for_line
from tests.recording_subscriber import Subscriber
from tests.store_pg.proxy import TcpProxy
from tradecanvas.bus.ids import StreamKeys

pytestmark = pytest.mark.e2e


def subscribe_all(since: int = 0, events_after: int | None = 0) -> list[OBJ]:
    return [
        {"type": "subscribe", "series_id": s, "since": since, "events_after": events_after}
        for s in (BASE, FIVE)
    ]


async def head(node: Node, series: str = BASE) -> int | None:
    async with httpx.AsyncClient(base_url=node.http) as client:
        doc = (await client.get("/api/market/candles", params={"series_id": series})).json()
    got = doc.get("server_head_time")
    return None if got is None else int(got)


async def everything(sub: Subscriber, data: Source) -> None:
    last, last5 = data.minutes[-1].candle_time, data.fives[-1].candle_time
    assert await sub.wait_until(
        lambda: last in sub.times(BASE) and last5 in sub.times(FIVE), WAIT_S
    )
    assert same(sub.closed(BASE), data.minutes), sub.times(BASE)
    assert same(sub.closed(FIVE), data.fives), sub.times(FIVE)
    assert not [m for m in sub.messages if m["type"] in ("gap", "error")]


def mid(data: Source, streamed: int = 60) -> int:
    return data.minutes[HISTORY_BARS + streamed].candle_time


@contextlib.asynccontextmanager
async def streaming(
    c: Cluster, data: Source, watch: list[tuple[Subscriber, Node]], streamed: int = 60
) -> AsyncIterator[trio.Nursery]:
    """Each subscriber on every series of its node, then the replay streaming; in once the
    first one has ``streamed`` minutes past the history (the fault lands mid-run). The
    subscribers are stopped on the way out."""
    async with trio.open_nursery() as nursery:
        for sub, node in watch:
            await nursery.start(sub.run, node.ws, subscribe_all())
        c.stream()
        first = watch[0][0]
        assert await first.wait_until(lambda: mid(data, streamed) in first.times(BASE), WAIT_S)
        yield nursery
        nursery.cancel_scope.cancel()


async def test_redis_restarting(tmp_path: Path, private_redis: PrivateRedis, pg_url: str) -> None:
    data = source(tmp_path)
    await private_redis.start()
    async with cluster(
        tmp_path, data, redis_url=private_redis.url, prefix="tcfault", database_url=pg_url
    ) as c:
        ingest, edge = c.ingest, c.edges[0]
        sub = Subscriber()
        async with streaming(c, data, [(sub, edge)]):
            private_redis.stop()
            await wait_ready(ingest, "bus_publisher_connected", False)
            await wait_ready(edge, "bus_feed_connected", False)
            await wait_dependency(ingest, "redis_publisher", 0.0)
            await wait_dependency(edge, "redis_feed", 0.0)
            # the ingest goes on committing while Redis is away
            later = mid(data, 120)
            await wait_for(lambda: _at_least(ingest, later), "commits while Redis is away")
            await private_redis.start()
            await wait_ready(edge, "bus_feed_connected", True)
            await wait_ready(ingest, "bus_publisher_connected", True)
            await everything(sub, data)
        await stop(edge, ingest)
    assert "bus publisher: Redis failed" in ingest.log.read_text()
    # the restart lost the lease too: its holder set it again and went on ingesting
    assert "ingest lease: the lease was gone" in ingest.log.read_text()
    assert "edge feed (closed): Redis failed" in edge.log.read_text()


async def _at_least(node: Node, t: int) -> bool:
    got = await head(node)
    return got is not None and got >= t


async def test_postgresql_going_away(
    tmp_path: Path, redis_url: str, keys: StreamKeys, pg_url: str
) -> None:
    data = source(tmp_path)
    proxy = TcpProxy(pg_url)
    async with trio.open_nursery() as outer:
        await outer.start(proxy.run)
        async with cluster(
            tmp_path, data, redis_url=redis_url, prefix=keys.prefix, database_url=proxy.url
        ) as c:
            ingest, edge = c.ingest, c.edges[0]
            sub = Subscriber()
            async with streaming(c, data, [(sub, edge)]):
                proxy.cut()
                for node in (ingest, edge):
                    await wait_ready(node, "store_reachable", False)
                    await wait_dependency(node, "store", 0.0)
                # until a commit gave up on its connection (the pool waits 10 s for one)
                await wait_for_line(
                    ingest.log, "candle store: write lost its connection", ingest.proc
                )
                proxy.restore()
                for node in (ingest, edge):
                    await wait_ready(node, "store_reachable", True)
                await everything(sub, data)
            await stop(edge, ingest)
        outer.cancel_scope.cancel()
    # the ingest's commits waited the outage out: nothing of a failed attempt went in
    assert "candle store: write lost its connection" in ingest.log.read_text()
    assert "unreachable" in ingest.log.read_text()
    assert "answers again" in edge.log.read_text()


async def test_an_edge_killed_while_clients_are_connected(
    tmp_path: Path, redis_url: str, keys: StreamKeys, pg_url: str
) -> None:
    data = source(tmp_path)
    # exchange holes before and after the kill: gap events on both sides of it
    holes = (
        "--exchange-hole",
        f"{HISTORY_BARS + 30}:1",
        "--exchange-hole",
        f"{HISTORY_BARS + 200}:1",
    )
    async with cluster(
        tmp_path,
        data,
        redis_url=redis_url,
        prefix=keys.prefix,
        database_url=pg_url,
        edges=2,
        replay_args=holes,
    ) as c:
        edge_a, edge_b = c.edges
        before, witness = Subscriber(), Subscriber()
        before.expect_loss = True
        async with streaming(c, data, [(before, edge_a), (witness, edge_b)], 100) as nursery:
            edge_a.proc.send_signal(signal.SIGKILL)
            await before.finished.wait()  # the connection broke
            assert before.lost is not None
            # what it had: the cursors of its resumption
            since = {s: before.times(s)[-1] for s in (BASE, FIVE)}
            events_after = max(m["event_id"] for m in before.messages if m["type"] == "system")
            after = Subscriber()
            resume = [
                {"type": "subscribe", "series_id": s, "since": since[s],
                 "events_after": events_after}
                for s in (BASE, FIVE)
            ]  # fmt: skip
            await nursery.start(after.run, edge_b.ws, resume)
            last = data.minutes[-1].candle_time
            for sub in (witness, after):
                assert await sub.wait_until(lambda s=sub: last in s.times(BASE), WAIT_S)  # type: ignore[misc]
            last5 = data.fives[-1].candle_time
            assert await witness.wait_until(lambda: last5 in witness.times(FIVE), WAIT_S)
            assert await after.wait_until(lambda: last5 in after.times(FIVE), WAIT_S)
        for series in (BASE, FIVE):
            # exactly what it missed: before + after is what the witness got, no more
            assert before.times(series) + after.times(series) == witness.times(series)
            assert before.closed(series) + after.closed(series) == witness.closed(series)
        assert _events(before) + _events(after) == _events(witness)
        assert any(e[1] == "gap" for e in _events(before))
        assert any(e[1] == "gap" for e in _events(after))
        await stop(edge_b, c.ingest)


def _events(sub: Subscriber) -> list[tuple[int, str, str]]:
    return [
        (m["event_id"], m["event"], m["series_id"]) for m in sub.messages if m["type"] == "system"
    ]


async def test_a_slow_edge(tmp_path: Path, redis_url: str, keys: StreamKeys, pg_url: str) -> None:
    data = source(tmp_path)
    async with cluster(
        tmp_path,
        data,
        redis_url=redis_url,
        prefix=keys.prefix,
        database_url=pg_url,
        edges=2,
        TRADE_CANVAS_BUS_MAXLEN="100",
    ) as c:
        slow, quick = c.edges
        on_slow, on_quick = Subscriber(), Subscriber()
        async with streaming(c, data, [(on_slow, slow), (on_quick, quick)], 20):
            slow.proc.send_signal(signal.SIGSTOP)
            try:
                # the other edge serves everything meanwhile: per-edge isolation
                await everything(on_quick, data)
                assert on_slow.times(BASE)[-1] < data.minutes[-1].candle_time
            finally:
                slow.proc.send_signal(signal.SIGCONT)
            # woken, it finds its position trimmed away (MAXLEN ~ 100) and fills the store
            await everything(on_slow, data)
        filled = metric(await metrics_text(slow.http), "tradecanvas_bus_filled_candles")
        assert filled is not None and filled > 0
        await stop(slow, quick, c.ingest)
