"""The ingest lease's shell (``bus/leader.py``) on the real Redis and a real store: one of two
nodes ingests, the other takes over once the holder stops renewing, a deposed holder stops,
and the fence refuses a stale holder's writes (nothing of them goes in)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio

from tests.conftest import candle
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.leader import FencedStore, IngestLeader
from tradecanvas.bus.lease import FENCE_KEY, FENCE_NODE_KEY, LeaseTiming, Verdict
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.errors import IngestFenced
from tradecanvas.ops.metrics import Metrics
from tradecanvas.store.sqlite import CandleStore

S = "binance:futures:BTC/USDT:1m"
T0 = 1_751_760_000
TIMING = LeaseTiming(400)
WAIT_S = 30.0


async def test_the_fence_refuses_a_stale_holder(tmp_path: Path) -> None:
    a = FencedStore(await CandleStore.open(tmp_path / "m.sqlite3"))
    b = FencedStore(await CandleStore.open(tmp_path / "m.sqlite3"))
    try:
        await b.upsert(S, [candle(T0, "1", "2", "1", "2", "3")], "ws")  # a standby: unfenced
        assert await a.take_fence("a") == (1, None)
        await a.upsert(S, [candle(T0 + 60, "1", "2", "1", "2", "3")], "ws")
        assert await b.take_fence("b") == (2, "a")
        with pytest.raises(IngestFenced, match="token is 2 \\(node b\\), this node's 1"):
            await a.upsert(S, [candle(T0 + 120, "1", "2", "1", "2", "3")], "ws")
        await b.upsert(S, [candle(T0 + 180, "1", "2", "1", "2", "3")], "ws")
        assert [c.candle_time for c in await a.since(S, -1, 10)] == [T0, T0 + 60, T0 + 180]
        assert await a.get_meta(FENCE_KEY) == "2"
        assert await a.get_meta(FENCE_NODE_KEY) == "b"
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_standby_takes_over_and_a_deposed_holder_stops(
    store: CandleStore, redis_url: str, keys: StreamKeys, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="tradecanvas.bus.leader")
    started: list[str] = []
    nodes = {
        name: IngestLeader(redis_url, keys, FencedStore(store), Metrics(), timing=TIMING, node=name)
        for name in ("a", "b")
    }

    def on_leader(name: str) -> Callable[[], Awaitable[None]]:
        async def start() -> None:
            started.append(name)

        return start

    async with trio.open_nursery() as nursery:
        async with trio.open_nursery() as a_alive:
            await a_alive.start(nodes["a"].run, on_leader("a"))
            with trio.fail_after(WAIT_S):
                await nodes["a"].wait_leader()
            nursery.start_soon(nodes["b"].run, on_leader("b"))
            # a holds it: b stands by, however often it asks
            async with open_redis(redis_url) as client:
                assert await client.get(keys.lease) == b"a"
            # a dies without letting go: b gets it once the TTL ran out
            a_alive.cancel_scope.cancel()
        with trio.fail_after(WAIT_S):
            await nodes["b"].wait_leader()
        assert started == ["a", "b"]
        assert nodes["b"].store.token == 2
        # the store's first holder is no news (INFO); a takeover from another is (WARNING)
        took = [(r.levelname, r.getMessage()) for r in caplog.records if "took the" in r.msg]
        assert [(level, message.split(";")[0]) for level, message in took] == [
            ("INFO", "ingest lease: node a took the lease over (fence 1, previous holder none)"),
            ("WARNING", "ingest lease: node b took the lease over (fence 2, previous holder a)"),
        ]
        # someone else holds the lease now: b's next renewal deposes it
        async with open_redis(redis_url) as client:
            await client.set(keys.lease, "c")
        nursery.cancel_scope.cancel()
    deposed = IngestLeader(redis_url, keys, FencedStore(store), Metrics(), timing=TIMING)
    deposed.core.on_acquire(True, None, trio.current_time())
    with pytest.raises(IngestFenced, match="node c holds the lease now"):
        with trio.fail_after(WAIT_S):
            await deposed.run(on_leader("x"))


async def test_release_lets_the_standby_in_at_once(
    store: CandleStore, redis_url: str, keys: StreamKeys
) -> None:
    leader = IngestLeader(redis_url, keys, FencedStore(store), Metrics(), timing=TIMING)

    async def nothing() -> None:
        pass

    async with trio.open_nursery() as nursery:
        await nursery.start(leader.run, nothing)
        with trio.fail_after(WAIT_S):
            await leader.wait_leader()
        nursery.cancel_scope.cancel()
    await leader.release()
    async with open_redis(redis_url) as client:
        assert await client.get(keys.lease) is None


async def test_a_node_that_starts_without_redis_says_so_once(
    store: CandleStore, keys: StreamKeys, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis refused from the start: one 'Redis failed' line beside 'stands by' (alone it
    read as if another node held the lease), not one per attempt."""
    node = IngestLeader(
        "redis://127.0.0.1:1/0", keys, FencedStore(store), Metrics(), timing=TIMING, node="a"
    )

    async def never() -> None:
        raise AssertionError("no lease without Redis")

    def failures() -> list[str]:
        return [r.getMessage() for r in caplog.records if "Redis failed" in r.getMessage()]

    asked = trio.Semaphore(0)
    ask = node._ask

    async def counted() -> Verdict:  # the real exchange, counted
        try:
            return await ask()
        finally:
            asked.release()

    node._ask = counted  # type: ignore[method-assign]
    with caplog.at_level("INFO", logger="tradecanvas.bus.leader"):
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run, never)
            with trio.fail_after(WAIT_S):
                for _ in range(3):  # several attempts, all refused
                    await asked.acquire()
            nursery.cancel_scope.cancel()
    assert len(failures()) == 1 and failures()[0].endswith("standing by")
