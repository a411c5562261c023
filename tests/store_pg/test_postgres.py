"""What only the PostgreSQL store has: migrations in ``schema_version``, the write lock that
hands out event ids in commit order across connections and processes, and its errors."""

from __future__ import annotations

import os
from typing import Any

import psycopg
import pytest
import trio
from psycopg import sql

from tests.conftest import candle
from tradecanvas.errors import StoreError
from tradecanvas.store.interface import WriteTxn
from tradecanvas.store.open import is_database_url, open_store, store_location
from tradecanvas.store.pg_pool import check_idle_connection
from tradecanvas.store.pg_schema import MIGRATIONS, SCHEMA_VERSION
from tradecanvas.store.postgres import PgStoreTxn, PostgresStore, describe_url
from tradecanvas.store.sqlite import CandleStore

SID = "binance:futures:BTC/USDT:1m"


def _versions(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        return [int(r[0]) for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]


async def test_fresh_database_is_migrated_and_reopening_applies_nothing(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url)
    await store.upsert(SID, [candle(60, "1", "1", "1", "1")], "ws")
    await store.aclose()
    assert _versions(pg_url) == list(range(1, SCHEMA_VERSION + 1))
    assert len(MIGRATIONS) == SCHEMA_VERSION
    store = await PostgresStore.open(pg_url)  # already applied: nothing runs again
    assert await store.head_time(SID) == 60
    await store.aclose()
    assert _versions(pg_url) == list(range(1, SCHEMA_VERSION + 1))


async def test_two_stores_opening_at_once_migrate_once(pg_url: str) -> None:
    stores: list[PostgresStore] = []

    async def open_one() -> None:
        stores.append(await PostgresStore.open(pg_url))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(open_one)
        nursery.start_soon(open_one)
    for store in stores:
        await store.aclose()
    assert _versions(pg_url) == list(range(1, SCHEMA_VERSION + 1))


async def test_a_schema_newer_than_the_code_is_refused(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url)
    await store.aclose()
    with psycopg.connect(pg_url) as conn:
        conn.execute("INSERT INTO schema_version (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    with pytest.raises(StoreError, match="newer than this tradecanvas") as info:
        await PostgresStore.open(pg_url)
    assert f"has schema {SCHEMA_VERSION + 1}, newer" in str(info.value)
    assert describe_url(pg_url) in str(info.value)


async def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    # port 1 on loopback: nothing listens there, the connection is refused at once
    url = "postgresql://someone:s3cret@127.0.0.1:1/market"
    with pytest.raises(StoreError) as info:
        await open_store(url)
    assert "127.0.0.1:1/market" in str(info.value)
    assert "s3cret" not in str(info.value)


async def test_event_ids_follow_commit_order_across_connections(pg_url: str) -> None:
    """Two stores (two pools, as two processes would have): the second writer waits for the
    first's commit, so its event id is the larger one even though it asked while the first
    transaction was still open."""
    first = await PostgresStore.open(pg_url)
    second = await PostgresStore.open(pg_url)
    token = trio.lowlevel.current_trio_token()
    first_holds_id = trio.Event()
    release_first = trio.Event()
    ids: dict[str, int] = {}
    commits: list[str] = []

    def slow_writer(txn: WriteTxn) -> int:
        event_id = txn.append_event(SID, "gap", {"who": "first"}, 1.0)
        trio.from_thread.run_sync(first_holds_id.set, trio_token=token)
        trio.from_thread.run(release_first.wait, trio_token=token)
        return event_id

    async def run_first() -> None:
        ids["first"] = await first.write(slow_writer)
        commits.append("first")

    async def run_second() -> None:
        ids["second"] = await second.write(
            lambda txn: txn.append_event(SID, "gap", {"who": "second"}, 2.0)
        )
        commits.append("second")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_first)
        await first_holds_id.wait()
        nursery.start_soon(run_second)
        with trio.fail_after(10):  # a bound on a hang, not a timed assertion
            await _wait_for_a_lock_waiter(pg_url)
        assert commits == []  # the second writer is blocked on the write lock
        release_first.set()
    # both committed; which task resumes first after its thread is the scheduler's choice
    # (under load the second's short transaction can come back first): the ids and the
    # event log show the commit order
    assert sorted(commits) == ["first", "second"]
    assert ids["first"] < ids["second"]
    events = await second.events_after(0)
    assert [(e.event_id, e.data["who"]) for e in events] == [
        (ids["first"], "first"),
        (ids["second"], "second"),
    ]
    await first.aclose()
    await second.aclose()


async def _wait_for_a_lock_waiter(url: str) -> None:
    """Until some session of ``url``'s database waits for a lock (the second writer)."""

    def waiting() -> bool:
        with psycopg.connect(url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ).fetchone()
        return row is not None and int(row[0]) > 0

    while not await trio.to_thread.run_sync(waiting):
        await trio.lowlevel.checkpoint()


async def test_many_concurrent_writers_get_distinct_increasing_ids(pg_url: str) -> None:
    stores = [await PostgresStore.open(pg_url) for _ in range(2)]
    got: list[list[int]] = [[], []]

    async def writer(i: int) -> None:
        for n in range(25):

            def append(txn: WriteTxn, n: int = n) -> int:
                return txn.append_event(SID, "gap", {"i": i, "n": n}, 1.0)

            got[i].append(await stores[i].write(append))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer, 0)
        nursery.start_soon(writer, 1)
    for ids in got:
        assert ids == sorted(ids)
    stored = [e.event_id for e in await stores[0].events_after(0, limit=100)]
    assert sorted(got[0] + got[1]) == stored and len(set(stored)) == 50
    for store in stores:
        await store.aclose()


async def test_open_store_picks_the_backend(pg_url: str, tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    assert is_database_url("postgresql://h/db") and is_database_url("postgres://h/db")
    assert not is_database_url(tmp_path / "m.sqlite3")
    assert store_location(tmp_path / "m.sqlite3", None) == tmp_path / "m.sqlite3"
    assert store_location(tmp_path / "m.sqlite3", pg_url) == pg_url
    sqlite = await open_store(tmp_path / "m.sqlite3")
    postgres = await open_store(pg_url)
    assert isinstance(sqlite, CandleStore) and isinstance(postgres, PostgresStore)
    await sqlite.aclose()
    await postgres.aclose()


def test_describe_url_hides_the_password() -> None:
    assert describe_url("postgresql://u:pw@db.example:6543/market") == (
        "postgresql://u@db.example:6543/market"
    )


async def test_connections_killed_by_the_server_are_replaced(pg_url: str) -> None:
    """A server restart, as this store sees it: every connection it holds is terminated.
    The next calls get new connections (a closed socket is noticed on the way out of the
    pool, ``check_idle_connection``), and the statistics count the lost ones."""
    store = await PostgresStore.open(pg_url)
    await store.upsert(SID, [candle(60, "1", "1", "1", "1")], "ws")
    assert await store.ping() is True
    before = store.statistics()
    assert before.pool_size >= 1

    def terminate_all() -> int:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            row = conn.execute(
                # the timeout: it returns once each backend is gone (its socket closed)
                "SELECT count(pg_terminate_backend(pid, 10000)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        return 0 if row is None else int(row[0])

    assert await trio.to_thread.run_sync(terminate_all) >= 1
    assert await store.head_time(SID) == 60
    await store.upsert(SID, [candle(120, "1", "1", "1", "1")], "ws")
    assert await store.head_time(SID) == 120
    assert store.statistics().connections_lost > before.connections_lost
    await store.aclose()
    assert await store.ping() is False


@pytest.mark.slow  # the pool waits CONNECT_TIMEOUT_S for a connection, twice
async def test_ping_is_false_when_the_server_is_gone(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url, pool_size=1)

    def drop_database() -> None:
        with psycopg.connect(pg_url.rsplit("/", 1)[0] + "/postgres", autocommit=True) as conn:
            name = pg_url.rsplit("/", 1)[1]
            conn.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))

    await trio.to_thread.run_sync(drop_database)
    with trio.fail_after(30):  # a bound on a hang, not a timed assertion
        assert await store.ping() is False
    with pytest.raises(StoreError, match="read failed"):
        await store.head_time(SID)
    await store.aclose()


async def test_the_heads_of_many_series_in_one_query(pg_url: str) -> None:
    store = await PostgresStore.open(pg_url)
    sids = [f"binance:futures:S{i}/USDT:1m" for i in range(4)]
    assert await store.write(lambda txn: txn.heads_of(sids)) == {}
    for i, sid in enumerate(sids[:3]):
        await store.upsert(sid, [candle(60 * j, "1", "1", "1", "1") for j in range(i + 1)], "ws")
    # a series with nothing stored is left out; one not asked for is not answered
    assert await store.write(lambda txn: txn.heads_of(sids[1:])) == {
        sid: 60 * i for i, sid in enumerate(sids[:3]) if i > 0
    }
    await store.aclose()


def test_the_pool_check_works_on_descriptors_above_select_s_limit(pg_url: str) -> None:
    """A daemon with thousands of subscribers opens its store connections on descriptors
    above 1024, where ``select.select`` refuses; the check must pass a live connection
    there and refuse one its server ended."""
    spare = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            assert conn.fileno() > 1024
            check_idle_connection(conn)  # alive and quiet: passes without a round trip
            with psycopg.connect(pg_url, autocommit=True) as killer:
                killer.execute("SELECT pg_terminate_backend(%s, 10000)", (conn.info.backend_pid,))
            with pytest.raises(psycopg.OperationalError):
                check_idle_connection(conn)
    finally:
        for fd in spare:
            os.close(fd)


async def test_a_transaction_s_events_and_meta_records_go_out_as_one_statement_each(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeframe's first bars make an event and a meta record per series: they are held
    back and sent as one statement each before the COMMIT, and whatever reads the same
    tables inside the transaction (the retention, a delete) sees them first."""
    store = await PostgresStore.open(pg_url)
    await store.set_meta("fingerprint:1", "old")
    sent: list[str] = []
    execute = psycopg.Connection.execute

    def counting(self: psycopg.Connection[object], query: str, *args: Any, **kw: Any) -> Any:
        sent.append(str(query))
        return execute(self, query, *args, **kw)

    monkeypatch.setattr(psycopg.Connection, "execute", counting)

    def first_bars(txn: WriteTxn) -> list[int]:
        ids = [txn.append_event(f"s{i}", "new_series", {"n": i}, float(i)) for i in range(100)]
        for i in range(100):
            txn.set_meta(f"fingerprint:{i}", f"v{i}")
        txn.set_meta("fingerprint:0", "again")  # the later value wins
        return ids

    ids = await store.write(first_bars)
    writes = [q for q in sent if "INSERT INTO events" in q or "INSERT INTO meta" in q]
    assert len(writes) == 2
    assert ids == list(range(ids[0], ids[0] + 100))
    assert [(e.event_id, e.series_id) for e in await store.events_after(0)] == [
        (ids[i], f"s{i}") for i in range(100)
    ]
    assert await store.events_newest_id() == ids[-1]
    assert (await store.get_meta("fingerprint:0"), await store.get_meta("fingerprint:99")) == (
        "again",
        "v99",
    )

    def then_read(txn: PgStoreTxn) -> tuple[int, int]:
        more = [txn.append_event("s", "gap", {}, 5.0) for _ in range(3)]
        txn.set_meta("fingerprint:1", "gone soon")
        txn.delete_meta("fingerprint:1")
        # the retention reads the events: the three held back are there to count
        return txn.prune_events(2, 0.0), more[0]

    pruned, first_more = await store.write(then_read)
    assert pruned == first_more
    assert [e.event_id for e in await store.events_after(0)] == [pruned + 1, pruned + 2]
    assert await store.get_meta("fingerprint:1") is None
    await store.aclose()
