"""PostgresStore: the candle store on PostgreSQL (DESIGN §10, ``TRADE_CANVAS_DATABASE_URL``).

The same methods and answers as the SQLite ``CandleStore`` (``store/sqlite.py``): exact
decimals (``NUMERIC``, the scale received kept), idempotent upserts with the same
NEW/UNCHANGED/REVISED outcomes, the event log with strictly increasing ids, meta records.

Concurrency: psycopg 3's synchronous API through a ``psycopg_pool.ConnectionPool``
(psycopg's async API is asyncio-only), every call in a worker thread through
``trio.to_thread.run_sync`` with a ``CapacityLimiter`` the size of the pool, so a thread never
waits for a connection. The pool is opened and closed in a worker thread too.
:meth:`PostgresStore.write` runs a whole function in one transaction that first takes the
store's write lock (a transaction-level advisory lock, released by the commit): one writer at
a time across every process sharing the database, as SQLite's ``BEGIN IMMEDIATE``. That keeps
the pipeline's read-derive-write correct when two ingest nodes write the same series, and
hands out event ids in commit order. Readers take no lock (MVCC: they see the last commit).

Speed (docs/architecture.md, "PostgreSQL store"). A write transaction runs in psycopg's
pipeline mode: its start (BEGIN, the write lock, the transaction number, the event counter,
and the meta table when needed, ``store/pg_start.py``) is sent at once, its writes go out
without waiting, and its COMMIT is one round trip; only a read inside it (a range the
pipeline's cache of recent bars lacks) waits. The meta table and the event counter are
kept between write transactions while the transaction number says nobody else wrote (one
more than this store's last): a transaction reads and writes the table in memory (and
writes it through), so the fencing token check and the derivation fingerprints cost no
round trip, and it runs its function on that guess while the start's answers come back;
they are checked before the COMMIT is sent. A number that jumped (another writer) rolls the
guess back and runs the function again on what the tables say (numbered
``RETRY_SEQUENCE_STEP`` above, see below); a failed transaction reads the tables again.

Connection loss (docs/operations.md, "Faults and what they look like"). A write that loses its
connection — the server restarting, a network cut, its backend terminated — is tried again,
with capped backoff, until the server answers: the transaction was rolled back, so nothing
of it is in. A write whose connection broke *during its COMMIT* may or may not have
committed: the commit token it recorded in the same transaction (``store/pg_commit_token.py``;
not its transaction id, which a server that crashed can give to another transaction) is
looked up under the write lock once the server answers again, before this store writes
anything else: there, the write's result stands; not there, it is tried again. A retry
numbers its transaction three above the last one (``StoreTxn.sequence``), so a caller's cache
of the store (``pipeline/recent.py``) forgets what the failed attempt put in. Reads are not
retried: they raise StoreError at once (a subscriber's catch-up ends, an HTTP read answers
500; both are read again later).
:attr:`PostgresStore.reachable` says whether the last statement, or the last :meth:`ping`,
reached the server: /readyz and ``tradecanvas_dependency_up{dependency="store"}`` (its log
lines: ``pg_pool.OutageLog``). Each
connection has TCP keepalives and ``idle_in_transaction_session_timeout``, so a backend whose
client vanished mid-transaction lets go of the write lock.

Raises :class:`StoreError` for any other PostgreSQL failure (unreachable server at start-up,
schema newer than this code, a constraint broken).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any, Final, TypeVar, final

import attrs
import psycopg
import trio
from psycopg_pool import ConnectionPool

from tradecanvas.errors import StoreError
from tradecanvas.model import Candle
from tradecanvas.store.pg_commit_token import CommitTokens
from tradecanvas.store.pg_pool import (
    CONNECTION_OPTIONS,
    RECONNECT_WINDOW_S,
    OutageLog,
    check_idle_connection,
    connection_lost,
    describe_url,
    first_line,
    translated,
)
from tradecanvas.store.pg_schema import SCHEMA_VERSION, WRITE_LOCK_KEY, migrate
from tradecanvas.store.pg_start import LastWrite, StaleStart, confirm, send_start
from tradecanvas.store.pg_txn import (
    Conn,
    PgStoreTxn,
    events_newest_id,
    events_pruned_upto,
    get_meta,
    head_time,
    select_candles,
    select_events,
)
from tradecanvas.store.schema import SchemaChange
from tradecanvas.store.types import (
    SeriesHead,
    Source,
    StoredCandle,
    StoredEvent,
    UpsertOutcome,
)
from tradecanvas.store.window import WindowReads
from tradecanvas.store.writer_lock import PgServeLock, take_pg_serve_lock
from tradecanvas.upstream.backoff import Backoff

log = logging.getLogger(__name__)

# Connections: one writer at a time plus parallel readers (catch-up, HTTP), as SQLite's 1 + 4.
POOL_SIZE: Final = 5
# Longest wait for the server at start-up, and for a connection after one broke: a store
# that cannot be reached fails start-up with a message instead of hanging.
CONNECT_TIMEOUT_S: Final = 10.0
# a ping (readiness) waits this long for a connection
PING_TIMEOUT_S: Final = 2.0
# between attempts of a write that lost its connection
RETRY_BACKOFF: Final = Backoff(base_s=0.1, cap_s=5.0)
# a retried write's transaction number jumps by this: never the failed attempt's + 1
RETRY_SEQUENCE_STEP: Final = 3
T = TypeVar("T")


class _Lost(Exception):
    """A write's connection broke; ``token`` (its commit token): it broke during the COMMIT."""

    def __init__(self, cause: psycopg.Error, token: int | None, result: list[Any]) -> None:
        super().__init__(first_line(cause))
        self.token = token
        self.result = result


def _open_pool(url: str, size: int, writes: bool) -> tuple[ConnectionPool[Conn], SchemaChange]:
    where = describe_url(url)
    # One plain connection first: an unreachable server or a refused login fails at once
    # with libpq's own reason (the pool would retry quietly until its timeout), and the
    # migrations run before any pooled connection exists.
    with (
        translated(f"open of {where}"),
        psycopg.connect(url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S)) as conn,
    ):
        change = migrate(conn, where, writes=writes)
    pool: ConnectionPool[Conn] = ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        kwargs={
            "autocommit": True,
            "connect_timeout": int(CONNECT_TIMEOUT_S),
            **CONNECTION_OPTIONS,
        },
        check=check_idle_connection,
        timeout=CONNECT_TIMEOUT_S,
        reconnect_timeout=RECONNECT_WINDOW_S,
        name="tradecanvas-store",
    )
    try:
        with translated(f"open of {where}"):
            pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except BaseException:
        pool.close()
        raise
    return pool, change


@attrs.frozen
class PostgresStoreStatistics:
    """The pool's view (psycopg_pool's counters since the store opened)."""

    pool_size: int  # connections open now
    pool_available: int  # of them, idle
    requests_waiting: int  # threads waiting for a connection (0 while the limiter holds)
    connections_errors: int  # failed connection attempts (server down, refused login)
    connections_lost: int  # connections found broken and replaced (a server restart)


@final
class PostgresStore(WindowReads):
    """Owns the connection pool. Open with :meth:`open`, close with :meth:`aclose`. Every
    method is a trio checkpoint and runs psycopg in a worker thread."""

    placeholder = "%s"

    def __init__(self, url: str, pool: ConnectionPool[Conn], size: int) -> None:
        self.location = describe_url(url)
        self._pool = pool
        self._limiter = trio.CapacityLimiter(size)
        self._write_limiter = trio.CapacityLimiter(1)
        self._closed = False
        self._write_started: float | None = None
        self._reachable = True
        self._outage = OutageLog(self.location, log)
        self.last_error: str | None = None
        self._tokens = CommitTokens()  # this store's commit tokens (one row: its writer id)
        # what the last write transaction left: what the next one starts from if nobody
        # else wrote in between (None: read it)
        self._last: LastWrite | None = None
        self.schema: SchemaChange | None = None  # what opening it did to its schema
        self.lock: PgServeLock | None = None  # serve's lock (all; ingest: shared), by aclose

    @classmethod
    async def open(
        cls, url: str, *, pool_size: int = POOL_SIZE, lock: bool = False, writes: bool = True
    ) -> PostgresStore:
        """Connect, apply the migrations, and return the open store. ``lock``: take serve's
        lock first (``store/writer_lock.py``; StoreInUse when another daemon holds it);
        ``writes=False``: a reader's (``export``), which never writes."""
        held = await take_pg_serve_lock(url) if lock else None
        try:
            pool, change = await trio.to_thread.run_sync(_open_pool, url, pool_size, writes)
        except BaseException:
            if held is not None:
                held.close()
            raise
        store = cls(url, pool, pool_size)
        store.schema, store.lock = change, held
        return store

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def reachable(self) -> bool:
        """Did the last statement (or ping) reach the server?"""
        return self._reachable and not self._closed

    def _note(self, reachable: bool, error: str | None = None) -> None:
        self._outage.note(reachable, error)
        self._reachable = reachable
        if error is not None:
            self.last_error = error

    def write_running_for(self) -> float:
        """Seconds the write in flight has been running (0 when idle)."""
        started = self._write_started
        return 0.0 if started is None else trio.current_time() - started

    def statistics(self) -> PostgresStoreStatistics:
        stats = self._pool.get_stats()
        return PostgresStoreStatistics(
            pool_size=stats.get("pool_size", 0),
            pool_available=stats.get("pool_available", 0),
            requests_waiting=stats.get("requests_waiting", 0),
            connections_errors=stats.get("connections_errors", 0),
            connections_lost=stats.get("connections_lost", 0),
        )

    async def ping(self) -> bool:
        """Does the server answer now (within :data:`PING_TIMEOUT_S` for a connection)?
        Updates :attr:`reachable`. A cancelled ping leaves its thread to finish on its own."""
        if self._closed:
            return False

        def _ping() -> str | None:
            try:
                with self._pool.connection(timeout=PING_TIMEOUT_S) as conn:
                    conn.execute("SELECT 1")
            except psycopg.Error as exc:
                return first_line(exc)
            return None

        error = await trio.to_thread.run_sync(_ping, limiter=self._limiter, abandon_on_cancel=True)
        self._note(error is None, error)
        return error is None

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            async with self._write_limiter:
                await trio.to_thread.run_sync(self._pool.close)
                if self.lock is not None:  # after the last commit
                    await trio.to_thread.run_sync(self.lock.close)

    async def write(self, fn: Callable[[PgStoreTxn], T], *, quick: bool = False) -> T:
        """Run ``fn`` in one transaction holding the store's write lock, on a worker thread
        (``quick``, a hint the SQLite store uses, changes nothing here: every statement
        waits on the server).

        An exception rolls everything back and propagates (psycopg errors as StoreError).
        Each attempt is shielded from cancellation: a batch is all in or all out. A lost
        connection is waited out (module docstring); the waits between attempts can be
        cancelled, and then nothing of the write is in.
        """
        attempt = 0
        while True:
            if self._closed:
                raise StoreError("candle store is closed")
            step = 1 if attempt == 0 else RETRY_SEQUENCE_STEP
            try:
                result = await self._write_once(fn, step)
            except _Lost as lost:
                attempt += 1
                delay = RETRY_BACKOFF.ceiling(attempt)
                log.warning(
                    "candle store: write lost its connection (%s); nothing of it is in, "
                    "trying again in %.1f s (attempt %d)",
                    lost,
                    delay,
                    attempt + 1,
                )
                await trio.sleep(delay)
                continue
            self._note(True)
            return result

    async def _write_once(self, fn: Callable[[PgStoreTxn], T], step: int) -> T:
        def _run() -> T:
            # what the previous write left, good while nobody else wrote
            known = self._last
            self._last = None  # until this transaction commits
            if known is not None and step == 1:
                try:
                    return self._transact(fn, step, known, guess=True)
                except StaleStart:
                    # another writer committed since: again from what the tables say,
                    # numbered so that a caller's cache forgets what the guess put in
                    return self._transact(fn, RETRY_SEQUENCE_STEP, None, guess=False)
            return self._transact(fn, step, known, guess=False)

        # Shielded from the wait for the writer on, as the SQLite store: a caller that took
        # candles out of its buffer must not lose them to a cancellation.
        with trio.CancelScope(shield=True):
            await self._write_limiter.acquire()
        try:
            with trio.CancelScope(shield=True):
                self._write_started = trio.current_time()
                try:
                    return await trio.to_thread.run_sync(_run, limiter=self._limiter)
                except _Lost as lost:
                    self._note(False, str(lost))
                    if lost.token is None:
                        raise
                    ambiguous, token = lost, lost.token
                finally:
                    self._write_started = None
            # its COMMIT lost its answer: asked holding the writer (a write of ours would change
            # the row asked about), not shielded (a cancelled caller does not learn the answer)
            if await self._committed(token):
                log.warning("candle store: the write's COMMIT lost its answer but went in")
                return ambiguous.result[0]  # type: ignore[no-any-return]
            raise ambiguous
        finally:
            self._write_limiter.release()

    def _transact(
        self, fn: Callable[[PgStoreTxn], T], step: int, known: LastWrite | None, *, guess: bool
    ) -> T:
        """One attempt of a write, in a worker thread. ``guess``: run ``fn`` on what the
        previous write left (``known``) while the start's answers are on their way
        (``store/pg_start.py``), and roll back with StaleStart if they differ."""
        token: int | None = None
        committing = False
        done: list[T] = []
        expected = -1 if known is None else known.sequence + step
        try:
            # pipeline mode: a statement whose answer nobody waits for (every write) goes
            # out with the next one that is waited for, so the transaction costs a round
            # trip per read it makes, plus the start's (overlapping fn when guessing) and
            # the COMMIT's
            with self._pool.connection() as conn, conn.pipeline(), conn.transaction():
                start = send_start(conn, WRITE_LOCK_KEY, step, expected, self._tokens)
                if guess:
                    assert known is not None
                    txn = PgStoreTxn(
                        conn, expected, meta=known.meta, last_event_id=known.last_event_id
                    )
                    try:
                        done.append(fn(txn))
                        txn.flush()
                        answers = confirm(start.result(), known)
                    except StaleStart:
                        raise
                    except Exception:
                        # a failure of a wrong guess (an event id taken, a fence that
                        # moved) is none: the start's cursors keep the answers they got
                        with contextlib.suppress(psycopg.Error):
                            confirm(start.result(), known)
                        raise
                    meta = known.meta
                else:
                    answers = start.result()
                    if answers.meta is not None:
                        meta = answers.meta
                    else:  # nobody else wrote: the table as this store left it
                        assert known is not None
                        meta = known.meta
                    txn = PgStoreTxn(
                        conn, answers.sequence, meta=meta, last_event_id=answers.last_event_id
                    )
                    done.append(fn(txn))
                    txn.flush()
                token = start.token
                committing = True  # leaving the block commits
            assert txn.last_event_id is not None
            self._last = LastWrite(answers.sequence, meta, txn.last_event_id)
            return done[0]
        except psycopg.Error as exc:
            if connection_lost(exc):
                raise _Lost(exc, token if committing else None, done) from exc
            raise StoreError(f"candle store write failed: {first_line(exc)}") from exc

    async def _committed(self, token: int) -> bool:
        """Did the transaction that recorded commit token ``token`` commit? Asked until the
        server answers and that transaction is over (``store/pg_commit_token.py``)."""
        attempt = 0
        while True:
            if self._closed:  # aclose waits for this writer
                raise StoreError("candle store closed before a write's COMMIT was confirmed")

            def _ask() -> bool | None:
                with self._pool.connection() as conn:
                    return self._tokens.committed(conn, token, WRITE_LOCK_KEY)

            try:
                answer = await trio.to_thread.run_sync(_ask, limiter=self._limiter)
            except psycopg.Error as exc:
                if not connection_lost(exc):
                    raise StoreError(f"candle store write failed: {first_line(exc)}") from exc
                self._note(False, first_line(exc))
                answer = None
            if answer is not None:
                self._note(True)
                return answer
            attempt += 1  # no answer, or the write lock still held (its backend lingers)
            await trio.sleep(RETRY_BACKOFF.ceiling(attempt))

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        if self._closed:
            raise StoreError("candle store is closed")

        def _run() -> T:
            with translated("read"), self._pool.connection() as conn:
                result = fn(conn)
            return result

        try:
            result = await trio.to_thread.run_sync(_run, limiter=self._limiter)
        except StoreError as exc:
            if exc.__cause__ is not None and connection_lost(exc.__cause__):
                self._note(False, str(exc))
            raise
        self._note(True)
        return result

    async def upsert(
        self, series_id: str, candles: Sequence[Candle], source: Source, *, complete: bool = True
    ) -> list[UpsertOutcome]:
        return await self.write(
            lambda txn: txn.upsert(series_id, candles, source, complete=complete)
        )

    async def select(self, where: str, params: tuple[object, ...]) -> list[StoredCandle]:
        """The rows of ``series_id = %s AND <where>`` (WindowReads' query)."""
        return await self._read(lambda conn: select_candles(conn, where, params))

    async def head_time(self, series_id: str) -> int | None:
        return await self._read(lambda conn: head_time(conn, series_id))

    async def heads(self) -> dict[str, SeriesHead]:
        """Head, first time and count of every stored series."""

        def q(conn: Conn) -> dict[str, SeriesHead]:
            cur = conn.execute(
                "SELECT series_id, MAX(candle_time), MIN(candle_time), COUNT(*)"
                " FROM candles GROUP BY series_id"
            )
            return {
                str(r[0]): SeriesHead(str(r[0]), int(str(r[1])), int(str(r[2])), int(str(r[3])))
                for r in cur
            }

        return await self._read(q)

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = 1000
    ) -> list[StoredEvent]:
        """Up to ``limit`` events with ``event_id > after`` (of ``series_ids`` when given),
        ascending."""
        return await self._read(lambda conn: select_events(conn, after, series_ids, limit))

    async def events_pruned_upto(self) -> int:
        """The highest event_id the retention dropped (0: none)."""
        return await self._read(events_pruned_upto)

    async def events_newest_id(self) -> int:
        """The highest event_id ever given (0: none), as the counter holds it."""
        return await self._read(events_newest_id)

    async def set_meta(self, key: str, value: str) -> None:
        await self.write(lambda txn: txn.set_meta(key, value))

    async def get_meta(self, key: str) -> str | None:
        return await self._read(lambda conn: get_meta(conn, key))


__all__ = [
    "POOL_SIZE",
    "SCHEMA_VERSION",
    "PgStoreTxn",
    "PostgresStore",
    "PostgresStoreStatistics",
    "describe_url",
]
