"""A real crash (``pg_ctl stop -m immediate``) of a private PostgreSQL cluster while a store
write waits for its COMMIT, which never reached the server: the recovered server gives the
lost transaction's id to the next transaction, another writer's, which commits. The write
must be tried again: the old store asked ``pg_xact_status`` about the id, heard
"committed", and returned with nothing of the write stored."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import trio

from tests.store_pg.commit_proxy import proxied_store
from tests.store_pg.private_cluster import PrivateCluster, private_cluster
from tests.store_pg.test_commit_token import T0, S, _write

pytestmark = pytest.mark.slow  # initdb and two server starts: a few seconds


@pytest.fixture
def cluster() -> Iterator[PrivateCluster]:
    with private_cluster() as made:
        yield made


def _next_xid(url: str) -> str:
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text").fetchone()
    assert row is not None
    return str(row[0])


def _another_writer_commits(url: str) -> str:
    """A transaction of another writer (an import, a second node): its id."""
    with psycopg.connect(url, autocommit=True) as conn, conn.transaction():
        conn.execute("INSERT INTO meta VALUES ('other_writer', '1')")
        row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
    assert row is not None
    return str(row[0])


async def test_a_write_lost_in_a_crash_is_tried_again_though_its_xid_was_reused(
    cluster: PrivateCluster,
) -> None:
    with psycopg.connect(cluster.url(), autocommit=True) as admin:
        admin.execute("CREATE DATABASE crash")
    url = cluster.url("crash")
    written: list[int] = []
    async with proxied_store(url) as (proxy, store), trio.open_nursery() as nursery:
        await store.write(_write(T0))
        lost_xid = _next_xid(url)  # the id the next write's transaction takes
        proxy.hold()
        done = trio.Event()

        async def write() -> None:
            written.append(await store.write(_write(T0 + 60)))
            done.set()

        nursery.start_soon(write)
        with trio.fail_after(30):
            await proxy.held.wait()  # its COMMIT never reaches the server
        await trio.to_thread.run_sync(cluster.crash)
        await trio.to_thread.run_sync(cluster.start)
        other_xid = await trio.to_thread.run_sync(_another_writer_commits, url)
        proxy.release()  # the write learns that its connection broke in the COMMIT
        with trio.fail_after(60):
            await done.wait()
        candles = [c.candle_time for c in await store.since(S, -1, 10)]
        events = [e.event_id for e in await store.events_after(0)]
    # the premise: the crash gave the lost transaction's id to the other writer
    assert other_xid == lost_xid
    assert candles == [T0, T0 + 60]  # the old store: [T0], the write lost
    assert events == [1, 2]
    assert written == [2]
