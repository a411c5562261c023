"""serve's PostgreSQL lock (``PgServeLock``, role ``all``) against a real server: the server
drops the session of a holder whose host vanished (its own keepalives), ``keep()`` tells
its own earlier session from another daemon's by more than the backend pid, a lock freed
while its holder is looked up is taken rather than called another daemon's, and a session
that ends right after the connect is tried again at the next tick, not a store failure."""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from typing import Any, Final

import psycopg
import pytest

from tradecanvas.errors import StoreInUse
from tradecanvas.store import writer_lock
from tradecanvas.store.lock_holder import LockHolder
from tradecanvas.store.writer_lock import SERVE_LOCK_KEY, PgServeLock

TCP_REPAIR: Final = 19  # linux/tcp.h (the socket module does not name it)
# how long the server is given to drop the vanished holder's session (keepalives of 1 s)
DROP_WITHIN_MS: Final = 20_000


def _terminate(url: str, backend: object) -> None:
    """End a session (as a server restart does), waiting until it is gone."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s, 10000)", (backend,))


def wait_until_free(url: str) -> None:
    """Until nobody holds the serve lock. A lock's close() closes its session's connection;
    the server's backend lets go of the lock as it exits, a moment later, so a take right
    after a close can still meet it. Waits on the server (an exclusive take bounded by
    lock_timeout), not a sleep; nothing may try the lock meanwhile (the waiter is queued)."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"SET lock_timeout = {DROP_WITHIN_MS}")
        conn.execute("SELECT pg_advisory_lock(%s)", (SERVE_LOCK_KEY,))
        conn.execute("SELECT pg_advisory_unlock(%s)", (SERVE_LOCK_KEY,))


def _vanish(conn: psycopg.Connection[Any]) -> None:
    """Make ``conn``'s end of its TCP connection disappear the way a host that lost power
    does: no FIN, no reset; the server hears nothing until it asks. TCP_REPAIR's silent
    close (needs CAP_NET_ADMIN). The ACK the kernel still owed for the last reply is sent
    first (TCP_QUICKACK), else the server sends that reply again and gets a reset at once."""
    fd = conn.pgconn.socket
    sock = socket.socket(fileno=os.dup(fd))
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
        except PermissionError:
            pytest.skip("a silent close (TCP_REPAIR) needs CAP_NET_ADMIN")
        devnull = os.open(os.devnull, os.O_RDWR)
        os.dup2(devnull, fd)  # psycopg's later close ends this, not the socket
        os.close(devnull)
    finally:
        sock.close()  # the socket's last reference: gone without a word


@pytest.fixture
def lock_of(pg_url: str) -> Iterator[list[PgServeLock]]:
    """Locks a test takes, closed at its end."""
    locks: list[PgServeLock] = []
    yield locks
    for lock in locks:
        lock.close()


def test_the_lock_session_asks_the_server_for_keepalives(pg_url: str) -> None:
    lock = PgServeLock.take(pg_url)
    try:
        assert lock._conn is not None
        said = {
            name: lock._conn.execute(f"SHOW {name}").fetchone()
            for name in (
                "tcp_keepalives_idle",
                "tcp_keepalives_interval",
                "tcp_keepalives_count",
                "idle_in_transaction_session_timeout",
                "idle_session_timeout",
            )
        }
        assert said == {
            "tcp_keepalives_idle": ("10",),
            "tcp_keepalives_interval": ("5",),
            "tcp_keepalives_count": ("3",),
            "idle_in_transaction_session_timeout": ("1min",),  # the pool's options kept
            "idle_session_timeout": ("0",),  # the lock's session is idle between checks
        }
    finally:
        lock.close()


def test_a_holder_whose_host_vanished_is_dropped_by_the_server(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old daemon's host died (power loss): its lock's session stayed on the server for
    the server's tcp_keepalives_idle (2 h here), and the restarted daemon was refused every
    time. The session's own keepalives (shortened to 1 s here: 10 s, 5 s x 3 in service)
    make the server drop it, and the lock is taken."""
    monkeypatch.setattr(
        writer_lock,
        "SERVER_KEEPALIVES",
        {"tcp_keepalives_idle": 1, "tcp_keepalives_interval": 1, "tcp_keepalives_count": 1},
        raising=False,
    )
    old = PgServeLock.take(pg_url)
    try:
        assert old._conn is not None
        _vanish(old._conn)
        with pytest.raises(StoreInUse):  # the ghost holds it still
            PgServeLock.take(pg_url).close()
        with psycopg.connect(pg_url, autocommit=True) as conn:
            # waits on the server until the ghost's session ends (or fails at the timeout)
            conn.execute(f"SET lock_timeout = {DROP_WITHIN_MS}")
            conn.execute("SELECT pg_advisory_lock(%s)", (SERVE_LOCK_KEY,))
            conn.execute("SELECT pg_advisory_unlock(%s)", (SERVE_LOCK_KEY,))
        PgServeLock.take(pg_url).close()  # the restarted daemon starts
    finally:
        old.close()


def test_another_daemons_session_with_our_old_backend_pid_is_not_ours(
    pg_url: str, lock_of: list[PgServeLock]
) -> None:
    """A server restart ends A's lock session; B (another daemon) takes the lock, its
    backend with the pid A's session had (the first backends after a start in a container
    get the same pids). A must stop (StoreInUse), not wait for "its own earlier session"
    forever while both ingest."""
    a = PgServeLock.take(pg_url)
    lock_of.append(a)
    _terminate(pg_url, a._backend)
    b = PgServeLock.take(pg_url)
    lock_of.append(b)
    a._backend = b._backend  # the pid collision (both sessions are of this process here)
    with pytest.raises(StoreInUse) as lost:
        a.keep()
    assert lost.value.running and "another tradecanvas serve of role all" in str(lost.value)
    assert not a.held and b.held


def test_our_own_earlier_session_still_holding_the_lock_is_waited_for(
    pg_url: str, lock_of: list[PgServeLock]
) -> None:
    """A network cut the server has not noticed: the old session (same pid, same start)
    still holds the lock. keep() waits for its end and then takes the lock again."""
    a = PgServeLock.take(pg_url)
    lock_of.append(a)
    cut, a._conn = a._conn, None  # this side's end of the cut connection is gone
    assert cut is not None
    a.keep()
    assert not a.held  # tried again later
    _terminate(pg_url, a._backend)  # the server notices the cut
    cut.close()
    a.keep()
    assert a.held


def _advisory_holder(url: str) -> psycopg.Connection[tuple[object, ...]]:
    """A session holding the serve lock's key (another holder, for a moment)."""
    conn = psycopg.connect(url, autocommit=True)
    conn.execute("SELECT pg_advisory_lock(%s)", (SERVE_LOCK_KEY,))
    return conn


def test_a_lock_freed_between_the_try_and_the_look_at_its_holder_is_taken(
    pg_url: str, lock_of: list[PgServeLock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The holder's session ends just after pg_try_advisory_lock failed and before the
    holder was looked up: nobody holds the lock, so it is tried again and taken; it was
    "in use by another daemon (holder unknown)", which stopped a running daemon (keep) or
    refused a starting one (take)."""
    holders = [_advisory_holder(pg_url)]  # the holder of a moment ago
    real = PgServeLock._holder
    looked = []

    def late_end(conn: psycopg.Connection[tuple[object, ...]], shared: bool) -> LockHolder | None:
        looked.append(True)
        if holders:
            ending = holders.pop()
            _terminate(pg_url, ending.info.backend_pid)  # its session ends now
            ending.close()
        return real(conn, shared)

    monkeypatch.setattr(PgServeLock, "_holder", staticmethod(late_end))
    starting = PgServeLock.take(pg_url)  # a daemon's start
    lock_of.append(starting)
    assert looked and starting.held

    _terminate(pg_url, starting._backend)  # a running daemon's keep(), its session ended
    holders.append(_advisory_holder(pg_url))
    looked.clear()
    starting.keep()
    assert looked and starting.held


def test_a_holder_that_keeps_vanishing_is_tried_again_later_not_called_another_daemon(
    pg_url: str, lock_of: list[PgServeLock], monkeypatch: pytest.MonkeyPatch
) -> None:
    a = PgServeLock.take(pg_url)
    lock_of.append(a)
    _terminate(pg_url, a._backend)
    other = _advisory_holder(pg_url)  # held, its holder never found
    real = PgServeLock._holder
    monkeypatch.setattr(PgServeLock, "_holder", staticmethod(lambda conn, shared: None))
    a.keep()  # no StoreInUse: the next tick looks again
    assert not a.held
    with pytest.raises(StoreInUse, match="ended each time it was looked up; try again"):
        PgServeLock.take(pg_url)
    monkeypatch.setattr(PgServeLock, "_holder", staticmethod(real))
    _terminate(pg_url, other.info.backend_pid)
    other.close()
    a.keep()
    assert a.held


def test_a_session_that_ends_right_after_the_connect_is_tried_again_with_one_warning(
    pg_url: str,
    lock_of: list[PgServeLock],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A server restart under way: the server accepts the connect, then ends the session
    before the lock query. That is the same outage as a refused connect (tried again at
    the next tick), not a store failure that stops the daemon; it is logged once."""
    a = PgServeLock.take(pg_url)
    lock_of.append(a)
    _terminate(pg_url, a._backend)  # the restart ends the lock's session
    real = PgServeLock._connect

    def connect_then_cut(self: PgServeLock) -> psycopg.Connection[tuple[object, ...]]:
        conn = real(self)
        _terminate(pg_url, conn.info.backend_pid)  # the shutdown reaches the new session
        return conn

    monkeypatch.setattr(PgServeLock, "_connect", connect_then_cut)
    caplog.set_level(logging.WARNING, logger=writer_lock.__name__)
    for _ in range(3):  # three ticks of one outage
        a.keep()
        assert not a.held
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 1 and "the serve lock is not held: its connection broke" in warned[0]
    monkeypatch.setattr(PgServeLock, "_connect", real)  # the server is back
    a.keep()
    assert a.held
    assert caplog.records[-1].getMessage().endswith(": serve lock taken again")
    # a later outage is logged again
    _terminate(pg_url, a._backend)
    monkeypatch.setattr(PgServeLock, "_connect", connect_then_cut)
    a.keep()
    assert len(caplog.records) == 3


def test_close_wins_over_a_keep_taking_the_lock_again_on_its_thread(
    pg_url: str, lock_of: list[PgServeLock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At shutdown hold() abandons its keep() on the worker thread: one taking the lock
    again after an outage stored its new connection after close(), a session holding the
    lock until the process exited (review rev36). And a keep() starting after close()
    connects no more."""
    a = PgServeLock.take(pg_url)
    lock_of.append(a)
    _terminate(pg_url, a._backend)  # an outage: the next keep() takes the lock again
    connected, closed = threading.Event(), threading.Event()
    real = PgServeLock._connect
    connects: list[int] = []

    def connect_then_wait(self: PgServeLock) -> psycopg.Connection[tuple[object, ...]]:
        conn = real(self)
        connects.append(conn.info.backend_pid)
        connected.set()
        assert closed.wait(timeout=60)
        return conn

    monkeypatch.setattr(PgServeLock, "_connect", connect_then_wait)
    keeper = threading.Thread(target=a.keep)
    keeper.start()
    assert connected.wait(timeout=60)
    a.close()  # the daemon stops while that keep() is on its way
    closed.set()
    keeper.join(timeout=60)
    assert not keeper.is_alive() and not a.held
    wait_until_free(pg_url)  # that keep()'s session let go of it (once its backend exited)
    a.keep()
    assert len(connects) == 1 and not a.held
