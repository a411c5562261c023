"""A starting serve (role ``all``) on PostgreSQL whose lock is held by a quiet session —
the daemon of a host that died and came back, or moved to another host, before the server
ended the old session — waits for the server to end it (``take_pg_serve_lock``) instead of
exiting 3 at once: systemd's five restarts 2 s apart ran out within 10 s, before the
server's keepalives (about 25 s) ended the session, and left the unit failed. A holder that
answers its checks is refused at once; a frozen one after the wait, naming the way out."""

from __future__ import annotations

import logging
from functools import partial

import psycopg
import pytest
import trio
import trio.testing

from tests.store_pg.test_serve_lock import _advisory_holder, _vanish
from tradecanvas.errors import StoreInUse
from tradecanvas.store import writer_lock
from tradecanvas.store.postgres import PostgresStore
from tradecanvas.store.writer_lock import PgServeLock, take_pg_serve_lock


def test_a_restart_waits_for_the_server_to_end_its_dead_hosts_session(
    pg_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The old daemon's host lost power (its lock's session vanished without a FIN); the
    daemon restarted at once opens the store with its lock, and gets it once the server's
    keepalives (1 s here, 10 s + 5 s x 3 in service) end the old session."""
    monkeypatch.setattr(
        writer_lock,
        "SERVER_KEEPALIVES",
        {"tcp_keepalives_idle": 1, "tcp_keepalives_interval": 1, "tcp_keepalives_count": 1},
    )
    monkeypatch.setattr(writer_lock, "QUIET_HOLDER_S", 0.0)  # quiet at once, not after 6 s
    monkeypatch.setattr(writer_lock, "KEEP_INTERVAL_S", 0.2)
    old = PgServeLock.take(pg_url)
    caplog.set_level(logging.WARNING, logger=writer_lock.__name__)
    try:
        assert old._conn is not None
        _vanish(old._conn)

        async def restart() -> None:
            store = await PostgresStore.open(pg_url, pool_size=1, lock=True)
            try:
                assert store.lock is not None and store.lock.held
            finally:
                await store.aclose()

        trio.run(restart)
    finally:
        old.close()
    waited = [r.getMessage() for r in caplog.records]
    assert len(waited) == 1, waited
    assert "held by a session that ran nothing for" in waited[0]
    assert "waiting up to 40 s" in waited[0]


def test_a_holder_that_answers_its_checks_is_refused_at_once(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    holder = PgServeLock.take(pg_url)
    caplog.set_level(logging.WARNING, logger=writer_lock.__name__)
    try:
        with pytest.raises(StoreInUse, match="its session quiet for 0 s") as refused:
            trio.run(partial(take_pg_serve_lock, pg_url, wait_s=3600))
    finally:
        holder.close()
    assert refused.value.quiet_s is not None and refused.value.quiet_s < 1
    assert "waited" not in str(refused.value)
    assert caplog.records == []


def test_a_frozen_holder_is_refused_after_the_wait_naming_the_way_out(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Frozen (SIGSTOP, a paused VM): the server never ends its session; after the wait the
    refusal says to end it with pg_terminate_backend. (A virtual clock: the wait's sleeps
    take no time; the server's answers are real.)"""
    holder: psycopg.Connection[tuple[object, ...]] = _advisory_holder(pg_url)
    caplog.set_level(logging.WARNING, logger=writer_lock.__name__)
    clock = trio.testing.MockClock(autojump_threshold=0)
    try:
        with pytest.raises(StoreInUse, match=r"waited 30 s .* pg_terminate_backend") as refused:
            trio.run(partial(take_pg_serve_lock, pg_url, quiet_s=0.0, wait_s=30), clock=clock)
    finally:
        holder.close()
    assert clock.current_time() >= 30
    assert "another tradecanvas serve of role all" in str(refused.value)
    assert len(caplog.records) == 1  # one warning for the whole wait
    # free now: taken at once
    trio.run(partial(take_pg_serve_lock, pg_url, quiet_s=0.0, wait_s=30)).close()
