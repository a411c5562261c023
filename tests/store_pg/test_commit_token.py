"""A write whose COMMIT lost its answer is decided by the commit token it recorded in the same
transaction (``store/pg_commit_token.py``), not by its transaction id: after a crash the
recovered server can give that id to another transaction, whose "committed" made the old
store take a lost write for one that went in (candles and events silently lost).

The crash's outcome is made deterministic here: the write's transaction id, as the store
reads it at its start (``pg_current_xact_id()``), is made the id of another transaction that
committed (a function of that name ahead of ``pg_catalog`` in the database's search_path),
and a proxy drops the write's COMMIT and closes its connection: the write never committed,
and the server says its id did."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Callable

import psycopg
import pytest
import trio
from psycopg.conninfo import conninfo_to_dict

from tests.conftest import candle
from tests.store_pg.commit_proxy import CommitProxy, proxied_store
from tradecanvas.errors import StoreError
from tradecanvas.store.open import open_store
from tradecanvas.store.pg_schema import SCHEMA_VERSION, WRITE_LOCK_KEY
from tradecanvas.store.pg_txn import PgStoreTxn
from tradecanvas.store.postgres import PostgresStore

S = "binance:futures:BTC/USDT:1m"
T0 = 1_751_760_000


def _write(t: int) -> Callable[[PgStoreTxn], int]:
    """A write of one candle and one event: returns the event's id."""

    def fn(txn: PgStoreTxn) -> int:
        txn.upsert(S, [candle(t, "1", "2", "1", "2", "3")], "ws")
        return txn.append_event(S, "candle_closed", {"t": t}, 0.0)

    return fn


async def _event_ids(store: PostgresStore) -> list[int]:
    return [e.event_id for e in await store.events_after(0)]


@pytest.fixture
async def through_proxy(pg_url: str) -> AsyncIterator[tuple[CommitProxy, PostgresStore]]:
    # the schema is made directly, so that nothing below depends on the search_path
    store = await PostgresStore.open(pg_url)
    await store.write(_write(T0))
    await store.aclose()
    async with proxied_store(pg_url) as opened:
        yield opened


def _give_our_xid_to_a_committed_transaction(pg_url: str) -> str:
    """What a crash restart can do: the id the write's transaction gets is one another
    transaction holds, and that one committed. Returns that id."""
    dbname = pg_url.rsplit("/", 1)[1]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with conn.transaction():  # another writer's transaction: it commits
            row = conn.execute("SELECT pg_current_xact_id()::text").fetchone()
        assert row is not None
        other = str(row[0])
        status = conn.execute("SELECT pg_xact_status(%s::xid8)", (other,)).fetchone()
        assert status == ("committed",)
        conn.execute("CREATE SCHEMA crash_sim")
        conn.execute(
            "CREATE FUNCTION crash_sim.pg_current_xact_id() RETURNS xid8 LANGUAGE sql"
            f" AS $$ SELECT '{other}'::xid8 $$"
        )
        conn.execute(f'ALTER DATABASE "{dbname}" SET search_path = crash_sim, pg_catalog, public')
    return other


async def test_a_lost_commit_whose_xid_another_transaction_committed_is_tried_again(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    _give_our_xid_to_a_committed_transaction(pg_url)
    async with proxied_store(pg_url) as (proxy, store):
        await store.write(_write(T0))
        proxy.arm(forward=False)  # the COMMIT never reaches the server
        with trio.fail_after(30):
            event_id = await store.write(_write(T0 + 60))
        assert proxy.cut == 1
        # the write is in, once: the old store took the other transaction's
        # "committed" for its own and returned with nothing of it stored
        assert [c.candle_time for c in await store.since(S, -1, 10)] == [T0, T0 + 60]
        assert await _event_ids(store) == [1, 2]
        assert event_id == 2
    said = [r.getMessage() for r in caplog.records if r.name == "tradecanvas.store.postgres"]
    assert any("write lost its connection" in m for m in said), said
    assert not any("went in" in m for m in said), said


async def test_a_commit_whose_answer_was_lost_is_not_written_twice(
    through_proxy: tuple[CommitProxy, PostgresStore], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    proxy, store = through_proxy
    try:
        proxy.arm(forward=True)  # the server commits; the answer never comes back
        with trio.fail_after(30):
            event_id = await store.write(_write(T0 + 60))
        assert proxy.cut == 1
        assert event_id == 2
        assert await _event_ids(store) == [1, 2]  # not tried again: no event 3
        assert [c.candle_time for c in await store.since(S, -1, 10)] == [T0, T0 + 60]
        # the next write goes on from there
        assert await store.write(_write(T0 + 120)) == 3
    finally:
        await store.aclose()
    said = [r.getMessage() for r in caplog.records if r.name == "tradecanvas.store.postgres"]
    assert any("COMMIT lost its answer but went in" in m for m in said), said


async def test_a_broken_write_leaves_no_warning_of_psycopg_and_no_error(
    through_proxy: tuple[CommitProxy, PostgresStore], caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg's pipeline and transaction blocks cannot end cleanly on a connection that
    broke: it logged ``error ignored terminating <psycopg.Pipeline [BAD] …>: the connection
    is lost`` as a WARNING (three times a write) beside the store's own lines, and the store
    said ``unreachable`` at ERROR for a loss it rides out."""
    caplog.set_level(logging.INFO)
    proxy, store = through_proxy
    try:
        proxy.arm(forward=False)
        with trio.fail_after(30):
            await store.write(_write(T0 + 60))
    finally:
        await store.aclose()
    loud = [
        (r.name, r.levelname, r.getMessage())
        for r in caplog.records
        if r.levelno >= logging.WARNING and not r.name.startswith("tradecanvas")
    ]
    assert loud == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    said = [r.getMessage() for r in caplog.records if r.name == "tradecanvas.store.postgres"]
    assert any("unreachable" in m for m in said), said
    assert any("answers again after" in m for m in said), said


async def test_one_row_per_writer_updated_and_stale_rows_pruned(pg_url: str) -> None:
    first = await PostgresStore.open(pg_url)
    second = await PostgresStore.open(pg_url)
    try:
        for i in range(3):
            await first.write(_write(T0 + 60 * i))
        await second.write(_write(T0 + 600))
        with psycopg.connect(pg_url, autocommit=True) as conn:
            rows = conn.execute("SELECT token FROM commit_tokens ORDER BY token").fetchall()
            assert rows == [(1,), (3,)]  # one row per writer, its last token
            conn.execute(
                "INSERT INTO commit_tokens VALUES ('gone', 7, now() - interval '8 days'),"
                " ('idle', 9, now() - interval '6 days')"
            )
        third = await PostgresStore.open(pg_url)
        try:
            await third.write(_write(T0 + 660))
        finally:
            await third.aclose()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            writers = {str(r[0]) for r in conn.execute("SELECT writer FROM commit_tokens")}
        assert "gone" not in writers  # older than KEEP_DAYS: its writer is long gone
        assert "idle" in writers
        assert len(writers) == 4
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_database_without_the_table_gets_it_without_a_schema_version(
    pg_url: str,
) -> None:
    store = await PostgresStore.open(pg_url)
    await store.aclose()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE commit_tokens")  # as a release before it left the database
    store = await PostgresStore.open(pg_url)
    try:
        assert store.schema is not None
        assert (store.schema.before, store.schema.after) == (SCHEMA_VERSION, SCHEMA_VERSION)
        await store.write(_write(T0))
    finally:
        await store.aclose()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        assert conn.execute("SELECT max(version) FROM schema_version").fetchone() == (
            SCHEMA_VERSION,
        )
        assert conn.execute("SELECT count(*) FROM commit_tokens").fetchone() == (1,)


async def test_a_login_that_may_not_create_the_table_reads_and_a_writer_is_told_why(
    pg_url: str,
) -> None:
    """PostgreSQL 15 gives no login but the owner CREATE on schema public: ``export`` (a
    reader) with such a login, on a database no writer of this release has opened yet,
    reads as before (it was refused: 'permission denied for schema public'); a writer is
    refused with what to do."""
    store = await PostgresStore.open(pg_url)
    await store.aclose()
    role = f"tc_reader_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("DROP TABLE commit_tokens")  # as a release before it left the database
        conn.execute(f"CREATE ROLE {role} LOGIN")
        conn.execute(
            f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
        )
        conn.execute(f"REVOKE CREATE ON SCHEMA public FROM {role}, PUBLIC")
    parts = conninfo_to_dict(pg_url)
    limited = f"postgresql://{role}@{parts['host']}:{parts['port']}/{parts['dbname']}"
    try:
        reader = await open_store(limited, writes=False)
        try:
            assert await reader.head_time(S) is None
        finally:
            await reader.aclose()
        with pytest.raises(StoreError) as refused:
            await open_store(limited)
        assert "commit_tokens, which is missing, and this login may not create it" in str(
            refused.value
        )
        assert "grant it CREATE on that schema" in str(refused.value)
    finally:
        with psycopg.connect(pg_url, autocommit=True) as conn:
            conn.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER")
            conn.execute(f"DROP OWNED BY {role}")
            conn.execute(f"DROP ROLE {role}")


def test_the_answer_is_the_token_not_what_else_committed(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The question itself: committed iff the writer's row holds the token, whatever other
    writers committed in between; a token whose transaction rolled back is not there."""
    from tradecanvas.store import pg_commit_token  # the old code lacks it
    from tradecanvas.store.pg_commit_token import CommitTokens

    async def make() -> None:
        await (await PostgresStore.open(pg_url)).aclose()

    trio.run(make)
    ours, other = CommitTokens(), CommitTokens()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with conn.transaction():
            committed = ours.record(conn)
        with conn.transaction():
            other.record(conn)  # another writer commits after ours
        assert ours.committed(conn, committed, WRITE_LOCK_KEY) is True
        try:
            with conn.transaction():
                lost = ours.record(conn)
                raise RuntimeError("roll back")
        except RuntimeError:
            pass
        with conn.transaction():
            other.record(conn)
        assert ours.committed(conn, lost, WRITE_LOCK_KEY) is False
        # a writer that never committed
        assert CommitTokens().committed(conn, 1, WRITE_LOCK_KEY) is False
        # the write lock held elsewhere (the lost transaction's backend not gone yet): no
        # answer until it is let go
        with psycopg.connect(pg_url, autocommit=True) as holder, holder.transaction():
            holder.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
            monkeypatch.setattr(pg_commit_token, "ASK_LOCK_TIMEOUT_MS", 50)
            assert ours.committed(conn, lost, WRITE_LOCK_KEY) is None


def test_an_outage_is_a_warning_then_an_error_if_it_lasts(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tradecanvas.store.pg_pool import OutageLog  # the old code lacks it

    now = [100.0]
    monkeypatch.setattr("tradecanvas.store.pg_pool.time.monotonic", lambda: now[0])
    log = logging.getLogger("test.outage")
    caplog.set_level(logging.INFO, logger="test.outage")
    outage = OutageLog("postgresql://db", log)
    outage.note(False, "PoolTimeout: …")
    now[0] += 3
    outage.note(False, "PoolTimeout: …")
    outage.note(True, None)  # a restart ridden out: no ERROR
    now[0] += 100
    outage.note(False, "refused")
    now[0] += 31
    outage.note(False, "refused")
    outage.note(False, "refused")  # said once
    now[0] += 2
    outage.note(True, None)
    said = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert [level for level, _ in said] == ["WARNING", "WARNING", "WARNING", "ERROR", "WARNING"]
    assert "unreachable: PoolTimeout" in said[0][1]
    assert said[1][1] == "candle store: postgresql://db answers again after 3.0 s"
    assert said[3][1] == "candle store: postgresql://db still unreachable after 31 s: refused"
    assert said[4][1].endswith("answers again after 33.0 s")
