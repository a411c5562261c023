"""PostgreSQL going away under an open store (issue 15 item 5), through a TCP proxy the test
cuts and restores, and by terminating the store's backends: a write waits the outage out and
goes in once, ``reachable`` and ``ping`` follow the server, a read fails at once with
StoreError, and a COMMIT whose answer was lost is resolved from the server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest
import trio

from tests.conftest import candle
from tests.store_pg.proxy import TcpProxy
from tradecanvas.errors import StoreError
from tradecanvas.store.postgres import PostgresStore

S = "binance:futures:BTC/USDT:1m"
T0 = 1_751_760_000


def reachable(store: PostgresStore) -> bool:
    return store.reachable


@pytest.fixture
async def proxied(pg_url: str) -> AsyncIterator[tuple[TcpProxy, PostgresStore]]:
    proxy = TcpProxy(pg_url)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        store = await PostgresStore.open(proxy.url)
        try:
            yield proxy, store
        finally:
            proxy.restore()
            await store.aclose()
            nursery.cancel_scope.cancel()


async def test_a_write_waits_out_an_outage_and_goes_in_once(
    proxied: tuple[TcpProxy, PostgresStore],
) -> None:
    proxy, store = proxied
    await store.upsert(S, [candle(T0, "1", "2", "1", "2", "3")], "ws")
    assert store.reachable and await store.ping()
    proxy.cut()
    assert not await store.ping()
    assert not reachable(store)
    with pytest.raises(StoreError, match="read failed"):
        await store.since(S, -1, 10)
    written = trio.Event()

    async def write() -> None:
        await store.upsert(S, [candle(T0 + 60, "2", "3", "2", "3", "4")], "ws")
        written.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(write)
        # the write is tried again and again while the proxy refuses
        with trio.move_on_after(1.5):
            await written.wait()
        assert not written.is_set()
        proxy.restore()
        with trio.fail_after(30):
            await written.wait()
    assert store.reachable
    assert [c.candle_time for c in await store.since(S, -1, 10)] == [T0, T0 + 60]


async def test_terminated_backends_cost_one_retry(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url)
    try:
        await store.upsert(S, [candle(T0, "1", "2", "1", "2", "3")], "ws")
        dbname = pg_url.rsplit("/", 1)[1]
        with psycopg.connect(pg_url, autocommit=True) as admin:
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = %s AND pid <> pg_backend_pid()",
                (dbname,),
            ).fetchone()
        assert killed is not None and killed[0] >= 1
        # the pool's connections are dead: the write notices, and goes in on a new one
        await store.upsert(S, [candle(T0 + 60, "2", "3", "2", "3", "4")], "ws")
        assert [c.candle_time for c in await store.since(S, -1, 10)] == [T0, T0 + 60]
        assert store.reachable
    finally:
        await store.aclose()


async def test_a_lost_commit_answer_is_resolved_from_the_server(pg_url: str) -> None:
    """By the commit token the write recorded, not its transaction id (which a server that
    crashed can give to another transaction: tests/store_pg/test_commit_token.py)."""
    store = await PostgresStore.open(pg_url)
    try:
        await store.upsert(S, [candle(T0, "1", "2", "1", "2", "3")], "ws")  # token 1
        other = await PostgresStore.open(pg_url)
        try:
            await other.upsert(S, [candle(T0 + 60, "1", "2", "1", "2", "3")], "ws")
        finally:
            await other.aclose()
        assert await store._committed(1)
        assert not await store._committed(2)  # never sent: as a COMMIT that never arrived
    finally:
        await store.aclose()
