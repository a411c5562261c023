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

Raises :class:`StoreError` for any PostgreSQL failure (unreachable server, schema newer than
this code, a broken connection mid-transaction: the transaction is rolled back).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final, TypeVar, final

import attrs
import psycopg
import trio
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import ConnectionPool

from tradecanvas.errors import StoreError
from tradecanvas.model import Candle
from tradecanvas.store.pg_schema import SCHEMA_VERSION, WRITE_LOCK_KEY, migrate
from tradecanvas.store.pg_txn import (
    Conn,
    PgStoreTxn,
    events_pruned_upto,
    get_meta,
    head_time,
    select_candles,
    select_events,
)
from tradecanvas.store.types import SeriesHead, Source, StoredCandle, StoredEvent, UpsertOutcome

# Connections: one writer at a time plus parallel readers (catch-up, HTTP), as SQLite's 1 + 4.
POOL_SIZE: Final = 5
# Longest wait for the server at start-up, and for a connection after one broke: a store
# that cannot be reached fails start-up with a message instead of hanging.
CONNECT_TIMEOUT_S: Final = 10.0
URL_SCHEMES: Final = ("postgresql://", "postgres://")
T = TypeVar("T")


def describe_url(url: str) -> str:
    """``postgresql://user@host:port/dbname`` without the password, for messages."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://<unparsable URL>"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


class _translated:
    """Translate psycopg errors into StoreError at the store's edge."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, psycopg.Error):
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise StoreError(
                f"candle store {self.what} failed: {type(exc).__name__}: {message}"
            ) from exc


def _open_pool(url: str, size: int) -> ConnectionPool[Conn]:
    where = describe_url(url)
    # One plain connection first: an unreachable server or a refused login fails at once
    # with libpq's own reason (the pool would retry quietly until its timeout), and the
    # migrations run before any pooled connection exists.
    with (
        _translated(f"open of {where}"),
        psycopg.connect(url, autocommit=True, connect_timeout=int(CONNECT_TIMEOUT_S)) as conn,
    ):
        migrate(conn, where)
    pool: ConnectionPool[Conn] = ConnectionPool(
        url,
        min_size=1,
        max_size=size,
        open=False,
        kwargs={"autocommit": True, "connect_timeout": int(CONNECT_TIMEOUT_S)},
        check=ConnectionPool.check_connection,
        timeout=CONNECT_TIMEOUT_S,
        name="tradecanvas-store",
    )
    try:
        with _translated(f"open of {where}"):
            pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
    except BaseException:
        pool.close()
        raise
    return pool


@attrs.frozen
class PostgresStoreStatistics:
    """The pool's view (psycopg_pool's counters since the store opened)."""

    pool_size: int  # connections open now
    pool_available: int  # of them, idle
    requests_waiting: int  # threads waiting for a connection (0 while the limiter holds)
    connections_errors: int  # failed connection attempts (server down, refused login)
    connections_lost: int  # connections found broken and replaced (a server restart)


@final
class PostgresStore:
    """Owns the connection pool. Open with :meth:`open`, close with :meth:`aclose`. Every
    method is a trio checkpoint and runs psycopg in a worker thread."""

    def __init__(self, url: str, pool: ConnectionPool[Conn], size: int) -> None:
        self.location = describe_url(url)
        self._pool = pool
        self._limiter = trio.CapacityLimiter(size)
        self._write_limiter = trio.CapacityLimiter(1)
        self._closed = False
        self._write_started: float | None = None

    @classmethod
    async def open(cls, url: str, *, pool_size: int = POOL_SIZE) -> PostgresStore:
        """Connect, apply the migrations, and return the open store."""
        pool = await trio.to_thread.run_sync(_open_pool, url, pool_size)
        return cls(url, pool, pool_size)

    @property
    def closed(self) -> bool:
        return self._closed

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
        """Does the server answer now? For readiness checks: bound it at the call site
        (``trio.move_on_after``); a cancelled ping leaves its thread to finish on its own."""
        if self._closed:
            return False

        def _ping() -> bool:
            try:
                with self._pool.connection() as conn:
                    conn.execute("SELECT 1")
            except psycopg.Error:
                return False
            return True

        return await trio.to_thread.run_sync(_ping, limiter=self._limiter, abandon_on_cancel=True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            async with self._write_limiter:
                await trio.to_thread.run_sync(self._pool.close)

    async def write(self, fn: Callable[[PgStoreTxn], T], *, quick: bool = False) -> T:
        """Run ``fn`` in one transaction holding the store's write lock, on a worker thread
        (``quick``, a hint the SQLite store uses, changes nothing here: every statement
        waits on the server).

        An exception rolls everything back and propagates (psycopg errors as StoreError).
        The commit is shielded from cancellation: a batch is all in or all out.
        """
        if self._closed:
            raise StoreError("candle store is closed")

        def _run() -> T:
            with _translated("write"), self._pool.connection() as conn, conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (WRITE_LOCK_KEY,))
                number = conn.execute(
                    "UPDATE write_counter SET last_sequence = last_sequence + 1"
                    " RETURNING last_sequence"
                ).fetchone()
                assert number is not None
                result = fn(PgStoreTxn(conn, int(str(number[0]))))
            return result

        # Shielded from the wait for the writer on, as the SQLite store: a caller that took
        # candles out of its buffer must not lose them to a cancellation.
        with trio.CancelScope(shield=True):
            async with self._write_limiter:
                self._write_started = trio.current_time()
                try:
                    result = await trio.to_thread.run_sync(_run, limiter=self._limiter)
                finally:
                    self._write_started = None
        return result

    async def _read(self, fn: Callable[[Conn], T]) -> T:
        if self._closed:
            raise StoreError("candle store is closed")

        def _run() -> T:
            with _translated("read"), self._pool.connection() as conn:
                result = fn(conn)
            return result

        return await trio.to_thread.run_sync(_run, limiter=self._limiter)

    async def upsert(
        self, series_id: str, candles: Sequence[Candle], source: Source, *, complete: bool = True
    ) -> list[UpsertOutcome]:
        return await self.write(
            lambda txn: txn.upsert(series_id, candles, source, complete=complete)
        )

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        """The newest ``limit`` candles, ascending."""

        def q(conn: Conn) -> list[Candle]:
            rows = select_candles(
                conn, "TRUE ORDER BY candle_time DESC LIMIT %s", (series_id, limit)
            )
            return [r.candle for r in reversed(rows)]

        return await self._read(q)

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        """Up to ``limit`` candles with ``candle_time > since`` (exclusive), ascending."""

        def q(conn: Conn) -> list[Candle]:
            rows = select_candles(
                conn, "candle_time > %s ORDER BY candle_time LIMIT %s", (series_id, since, limit)
            )
            return [r.candle for r in rows]

        return await self._read(q)

    async def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        """Candles with ``start <= candle_time < end``, ascending, with source and mark."""
        return await self._read(
            lambda conn: select_candles(
                conn,
                "candle_time >= %s AND candle_time < %s ORDER BY candle_time",
                (series_id, start, end),
            )
        )

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
