"""The two topologies on one PostgreSQL database refuse each other (``store/lock_holder.py``,
``store/writer_lock.py``): serve's lock is exclusive for role ``all`` and shared for role
``ingest``, so a role ``all`` daemon is refused while any ingest node runs, an ingest node
while a role ``all`` daemon runs, and ingest nodes run together (the Redis lease picks the
writer). Both ingested side by side before: every event twice, twice the Binance
connections. The real CLI: tests/bus/test_topology_lock.py."""

from __future__ import annotations

import logging
import os
from functools import partial

import psycopg
import pytest
import trio
import trio.testing

from tests.store_pg.test_serve_lock import _terminate, wait_until_free
from tradecanvas.errors import ExitCode, StoreInUse, start_failure
from tradecanvas.store import writer_lock
from tradecanvas.store.open import open_served_store
from tradecanvas.store.postgres import PostgresStore
from tradecanvas.store.writer_lock import SERVE_LOCK_KEY, PgServeLock, take_pg_serve_lock

HOLDER = f"(tradecanvas serve pid {os.getpid()} on "


def _lock_of(store: object) -> PgServeLock:
    assert isinstance(store, PostgresStore) and store.lock is not None
    return store.lock


async def test_role_ingest_is_refused_while_a_role_all_daemon_runs(pg_url: str) -> None:
    single = await open_served_store(pg_url, "all")
    try:
        with pytest.raises(StoreInUse) as refused:
            await open_served_store(pg_url, "ingest")
        said = str(refused.value)
        assert said.startswith(f"candle store {pg_url} is in use by another tradecanvas serve")
        assert f"of role all {HOLDER}" in said
        assert "a daemon of role ingest does not run beside the single process" in said
        assert said.endswith("stop that one first (its unit: systemctl disable --now tradecanvas)")
        failure = start_failure(BaseExceptionGroup("", [refused.value]))
        assert failure is not None and failure[0] == ExitCode.STORE_FAILURE
        assert _lock_of(single).held
    finally:
        await single.aclose()
    await trio.to_thread.run_sync(wait_until_free, pg_url)
    ingest = await open_served_store(pg_url, "ingest")  # the single one stopped
    await ingest.aclose()


async def test_role_all_is_refused_while_ingest_nodes_run_and_they_run_together(
    pg_url: str,
) -> None:
    first = await open_served_store(pg_url, "ingest")
    try:
        second = await open_served_store(pg_url, "ingest")  # the standby: both hold it
        try:
            assert _lock_of(first).held and _lock_of(second).held
            with pytest.raises(StoreInUse) as refused:
                await open_served_store(pg_url, "all")
            said = str(refused.value)
            assert f"is in use by another tradecanvas serve of role ingest {HOLDER}" in said
            assert "; 2 sessions hold it), which holds its serve lock" in said
            assert "a daemon of role all does not run beside the split topology's" in said
            assert said.endswith(
                "stop them first (their units: tradecanvas@<instance>), or run this one"
                " with --role ingest or edge"
            )
            edge = await open_served_store(pg_url, "edge")  # takes nothing
            await edge.aclose()
        finally:
            await second.aclose()
        with pytest.raises(StoreInUse, match="of role ingest"):  # one ingest node is enough
            await open_served_store(pg_url, "all")
    finally:
        await first.aclose()
    await trio.to_thread.run_sync(wait_until_free, pg_url)
    single = await open_served_store(pg_url, "all")  # the split topology stopped
    await single.aclose()


async def test_an_ingest_node_stops_when_a_role_all_daemon_took_the_lock_meanwhile(
    pg_url: str,
) -> None:
    """A PostgreSQL restart ended the ingest node's lock session and a role all daemon
    started before the node took it again: the node stops (exit 3), as role all does."""
    ingest = await open_served_store(pg_url, "ingest")
    try:
        lock = _lock_of(ingest)
        await trio.to_thread.run_sync(_terminate, pg_url, lock._backend)
        single = await PostgresStore.open(pg_url, lock=True)
        try:
            with pytest.raises(StoreInUse, match="of role all") as lost:
                await trio.to_thread.run_sync(lock.keep)
            assert lost.value.running and not lock.held
        finally:
            await single.aclose()
        await trio.to_thread.run_sync(wait_until_free, pg_url)
        await trio.to_thread.run_sync(lock.keep)  # the single one gone: taken again
        assert lock.held
    finally:
        await ingest.aclose()


def _quiet_holder(url: str, shared: bool) -> psycopg.Connection[tuple[object, ...]]:
    """A session holding the serve lock (``shared``: as an ingest node's, else as role
    all's) that runs nothing more: its daemon frozen, or its host dead."""
    conn = psycopg.connect(url, autocommit=True, application_name="frozen daemon")
    take = "pg_advisory_lock_shared" if shared else "pg_advisory_lock"
    conn.execute(f"SELECT {take}(%s)", (SERVE_LOCK_KEY,))
    return conn


@pytest.mark.parametrize(("holder_role", "taker_role"), [("ingest", "all"), ("all", "ingest")])
def test_a_quiet_holder_of_the_other_role_is_waited_for_then_named_with_the_way_out(
    pg_url: str, caplog: pytest.LogCaptureFixture, holder_role: str, taker_role: str
) -> None:
    """The quiet-holder wait holds across the roles: a daemon started where only a quiet
    session of the other role keeps it out waits for the server to end it (a host that
    died), and is refused after the wait naming pg_terminate_backend. (A virtual clock:
    the wait's sleeps take no time; the server's answers are real.)"""
    holder = _quiet_holder(pg_url, shared=holder_role == "ingest")
    caplog.set_level(logging.WARNING, logger=writer_lock.__name__)
    clock = trio.testing.MockClock(autojump_threshold=0)
    take = partial(
        take_pg_serve_lock, pg_url, shared=taker_role == "ingest", quiet_s=0.0, wait_s=30
    )
    try:
        with pytest.raises(StoreInUse, match=r"waited 30 s .* pg_terminate_backend") as refused:
            trio.run(take, clock=clock)
    finally:
        holder.close()
    wait_until_free(pg_url)
    said = str(refused.value)
    assert f"another tradecanvas serve of role {holder_role} (frozen daemon from" in said
    assert f"a daemon of role {taker_role} does not run beside" in said
    assert clock.current_time() >= 30
    assert len(caplog.records) == 1 and "waiting up to 30 s" in caplog.records[0].getMessage()
    trio.run(take).close()  # its session ended: taken at once


def test_of_several_ingest_sessions_the_last_active_one_is_named(pg_url: str) -> None:
    """The refusal speaks for the holder that ran a statement last: a running node (it
    checks its lock every 2 s) refuses a role all daemon at once, even beside the session
    of a node whose host died, whose quiet time alone would have had it wait."""
    quiet = _quiet_holder(pg_url, shared=True)
    live = PgServeLock.take(pg_url, shared=True)  # its statements come after the quiet one's
    try:
        with pytest.raises(StoreInUse) as refused:
            PgServeLock.take(pg_url)
        said = str(refused.value)
        assert f"of role ingest {HOLDER}" in said and "; 2 sessions hold it)" in said
        assert "frozen daemon" not in said
    finally:
        live.close()
        quiet.close()
