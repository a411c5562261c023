"""CandleStore: every candle on SQLite, exactly as received (DESIGN §4).

One table keyed by ``(series_id, candle_time)`` holds the decimal text of each price and
volume, the optional Binance extras, the ``source`` and a ``complete`` mark for derived
candles. WAL journal with ``synchronous=FULL``: a committed batch survives a power cut.

Concurrency: one writer connection behind a ``CapacityLimiter(1)`` and a small pool of
reader connections behind their own limiter, all used from worker threads through
``trio.to_thread.run_sync``. Under WAL a reader sees the last commit and never waits
behind a long write. :meth:`CandleStore.write` runs a whole function in one transaction, so
the pipeline commits base and derived candles of a batch together or not at all.

Raises :class:`StoreError` for any SQLite failure (disk full, read-only, corrupt file).
"""

from __future__ import annotations

import enum
import sqlite3
from collections.abc import Callable, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Final, Literal, TypeVar, final

import attrs
import trio

from tradecanvas.errors import StoreError
from tradecanvas.model import Candle

Source = Literal["ws", "rest", "http", "derived"]
# Readers run in parallel threads; two cores here, and reads are short index range scans.
READER_CONNECTIONS: Final = 4
T = TypeVar("T")

_MIGRATIONS: Final[tuple[str, ...]] = (
    # 1: the candle table and a key/value table for settings such as the fingerprint
    """
    CREATE TABLE candles (
        series_id TEXT NOT NULL,
        candle_time INTEGER NOT NULL,
        open TEXT NOT NULL,
        high TEXT NOT NULL,
        low TEXT NOT NULL,
        close TEXT NOT NULL,
        volume TEXT NOT NULL,
        quote_volume TEXT,
        trades INTEGER,
        taker_buy_base TEXT,
        taker_buy_quote TEXT,
        source TEXT NOT NULL CHECK (source IN ('ws', 'rest', 'http', 'derived')),
        complete INTEGER NOT NULL DEFAULT 1 CHECK (complete IN (0, 1)),
        PRIMARY KEY (series_id, candle_time)
    ) WITHOUT ROWID;
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION: Final = len(_MIGRATIONS)
_COLUMNS: Final = (
    "candle_time, open, high, low, close, volume, quote_volume, trades,"
    " taker_buy_base, taker_buy_quote, source, complete"
)


class UpsertOutcome(enum.Enum):
    NEW = "new"
    UNCHANGED = "unchanged"
    REVISED = "revised"


@attrs.frozen
class StoredCandle:
    candle: Candle
    source: Source
    complete: bool


@attrs.frozen
class SeriesHead:
    series_id: str
    head_time: int
    first_time: int
    count: int


def _text(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _row_to_stored(row: tuple[object, ...]) -> StoredCandle:
    (t, o, h, lo, c, v, q, n, tb, tq, source, complete) = row
    candle = Candle(
        candle_time=int(t),  # type: ignore[call-overload]
        open=Decimal(str(o)),
        high=Decimal(str(h)),
        low=Decimal(str(lo)),
        close=Decimal(str(c)),
        volume=Decimal(str(v)),
        quote_volume=_dec(q),  # type: ignore[arg-type]
        trades=n,  # type: ignore[arg-type]
        taker_buy_base=_dec(tb),  # type: ignore[arg-type]
        taker_buy_quote=_dec(tq),  # type: ignore[arg-type]
    )
    return StoredCandle(candle, source, bool(complete))  # type: ignore[arg-type]


class _translated:
    """Translate sqlite3 errors into StoreError at the store's edge."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> None:
        if isinstance(exc, sqlite3.Error):
            raise StoreError(
                f"candle store {self.what} failed: {type(exc).__name__}: {exc}"
            ) from exc


@final
class StoreTxn:
    """The synchronous view of the store inside one write transaction (a worker thread)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def upsert(
        self,
        series_id: str,
        candles: Sequence[Candle],
        source: Source,
        *,
        complete: bool = True,
    ) -> list[UpsertOutcome]:
        """Insert or update ``candles``; per candle, was it new, unchanged or revised?

        Values are compared numerically, so ``1.0`` and ``1.00`` are the same price. An
        unchanged candle keeps its stored text and source, but gains extras it lacked and
        the newer ``complete`` mark.
        """
        if not candles:
            return []
        times = [c.candle_time for c in candles]
        existing = {
            s.candle.candle_time: s for s in self.range(series_id, min(times), max(times) + 1)
        }
        outcomes: list[UpsertOutcome] = []
        for candle in candles:
            old = existing.get(candle.candle_time)
            if old is None:
                self._write(series_id, candle, source, complete, replace=False)
                outcomes.append(UpsertOutcome.NEW)
            elif not old.candle.same_values(candle):
                self._write(series_id, candle, source, complete, replace=True)
                outcomes.append(UpsertOutcome.REVISED)
            else:
                if old.complete != complete or _gains_extras(old.candle, candle):
                    merged = _merge_extras(old.candle, candle)
                    self._write(series_id, merged, old.source, complete, replace=True)
                outcomes.append(UpsertOutcome.UNCHANGED)
            existing[candle.candle_time] = StoredCandle(candle, source, complete)
        return outcomes

    def _write(
        self, series_id: str, c: Candle, source: Source, complete: bool, *, replace: bool
    ) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self._conn.execute(
            f"{verb} INTO candles (series_id, {_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                series_id,
                c.candle_time,
                _text(c.open),
                _text(c.high),
                _text(c.low),
                _text(c.close),
                _text(c.volume),
                _text(c.quote_volume),
                c.trades,
                _text(c.taker_buy_base),
                _text(c.taker_buy_quote),
                source,
                int(complete),
            ),
        )

    def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        """Stored candles with ``start <= candle_time < end``, ascending."""
        return _select(
            self._conn,
            "candle_time >= ? AND candle_time < ? ORDER BY candle_time",
            (series_id, start, end),
        )

    def last_before(self, series_id: str, t: int) -> StoredCandle | None:
        rows = _select(
            self._conn, "candle_time < ? ORDER BY candle_time DESC LIMIT 1", (series_id, t)
        )
        return rows[0] if rows else None

    def head_time(self, series_id: str) -> int | None:
        return _head_time(self._conn, series_id)

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def _gains_extras(old: Candle, new: Candle) -> bool:
    return any(
        getattr(old, name) is None and getattr(new, name) is not None
        for name in ("quote_volume", "trades", "taker_buy_base", "taker_buy_quote")
    )


def _merge_extras(old: Candle, new: Candle) -> Candle:
    return attrs.evolve(
        old,
        quote_volume=old.quote_volume if old.quote_volume is not None else new.quote_volume,
        trades=old.trades if old.trades is not None else new.trades,
        taker_buy_base=old.taker_buy_base if old.taker_buy_base is not None else new.taker_buy_base,
        taker_buy_quote=old.taker_buy_quote
        if old.taker_buy_quote is not None
        else new.taker_buy_quote,
    )


def _select(conn: sqlite3.Connection, where: str, params: tuple[object, ...]) -> list[StoredCandle]:
    cur = conn.execute(
        f"SELECT {_COLUMNS} FROM candles WHERE series_id = ? AND {where}",  # noqa: S608
        params,
    )
    return [_row_to_stored(row) for row in cur.fetchall()]


def _head_time(conn: sqlite3.Connection, series_id: str) -> int | None:
    row = conn.execute(
        "SELECT MAX(candle_time) FROM candles WHERE series_id = ?", (series_id,)
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=30.0
    )  # autocommit mode: transactions are explicit
    conn.execute("PRAGMA busy_timeout = 30000")
    return conn


def _open_writer(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = _connect(path)
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"candle store {path}: cannot use WAL journal (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        migrate(conn)
        conn.execute("PRAGMA quick_check(1)")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection) -> int:
    """Apply the forward migrations above ``PRAGMA user_version``; return the new version."""
    version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"candle store schema version {version} is newer than this tradecanvas"
            f" ({SCHEMA_VERSION}); upgrade tradecanvas"
        )
    for number in range(version, SCHEMA_VERSION):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _MIGRATIONS[number].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {number + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    return SCHEMA_VERSION


@final
class CandleStore:
    """Owns the SQLite file and its connections. Open with :meth:`open`, close with
    :meth:`aclose`. Every method is a trio checkpoint and runs SQLite in a worker thread."""

    def __init__(self, path: Path, writer: sqlite3.Connection) -> None:
        self.path = path
        self._writer = writer
        self._write_limiter = trio.CapacityLimiter(1)
        self._readers: list[sqlite3.Connection] = []
        self._read_limiter = trio.CapacityLimiter(READER_CONNECTIONS)
        self._closed = False
        self._write_started: float | None = None

    def write_running_for(self) -> float:
        """Seconds the write in flight has been running (0 when idle): the watchdog's view
        of whether the pipeline makes progress."""
        started = self._write_started
        return 0.0 if started is None else trio.current_time() - started

    @property
    def closed(self) -> bool:
        return self._closed

    @classmethod
    async def open(cls, path: Path | str) -> CandleStore:
        path = Path(path)

        def _open() -> sqlite3.Connection:
            with _translated(f"open of {path}"):
                try:
                    return _open_writer(path)
                except OSError as exc:
                    raise StoreError(f"candle store open of {path} failed: {exc}") from exc

        return cls(path, await trio.to_thread.run_sync(_open))

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._write_limiter:
            conns = [self._writer, *self._readers]
            self._readers.clear()

            def _close_all() -> None:
                for conn in conns:
                    conn.close()

            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close_all)

    async def write(self, fn: Callable[[StoreTxn], T]) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction on the writer thread.

        An exception rolls everything back and propagates (SQLite errors as StoreError).
        The commit is shielded from cancellation: a batch is all in or all out.
        """
        if self._closed:
            raise StoreError("candle store is closed")

        def _run() -> T:
            conn = self._writer
            with _translated("write"):
                conn.execute("BEGIN IMMEDIATE")
                try:
                    result = fn(StoreTxn(conn))
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                return result

        # Shielded from the wait for the writer on: a caller that already took candles out
        # of its buffer must not lose them to a cancellation while another write runs.
        # Writes are short, so the shield is bounded in practice.
        with trio.CancelScope(shield=True):
            async with self._write_limiter:
                self._write_started = trio.current_time()
                try:
                    result = await trio.to_thread.run_sync(_run)
                finally:
                    self._write_started = None
        return result

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._closed:
            raise StoreError("candle store is closed")
        async with self._read_limiter:
            if self._readers:
                conn = self._readers.pop()
            else:
                conn = await trio.to_thread.run_sync(self._new_reader)

            def _run() -> T:
                with _translated("read"):
                    return fn(conn)

            try:
                return await trio.to_thread.run_sync(_run)
            finally:
                if self.closed:
                    conn.close()
                else:
                    self._readers.append(conn)

    def _new_reader(self) -> sqlite3.Connection:
        with _translated("open of a reader"):
            conn = _connect(self.path)
            conn.execute("PRAGMA query_only = ON")
            return conn

    async def upsert(
        self, series_id: str, candles: Sequence[Candle], source: Source, *, complete: bool = True
    ) -> list[UpsertOutcome]:
        return await self.write(
            lambda txn: txn.upsert(series_id, candles, source, complete=complete)
        )

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        """The newest ``limit`` candles, ascending."""

        def q(conn: sqlite3.Connection) -> list[Candle]:
            rows = _select(conn, "1 ORDER BY candle_time DESC LIMIT ?", (series_id, limit))
            return [r.candle for r in reversed(rows)]

        return await self._read(q)

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        """Up to ``limit`` candles with ``candle_time > since`` (exclusive), ascending."""

        def q(conn: sqlite3.Connection) -> list[Candle]:
            rows = _select(
                conn, "candle_time > ? ORDER BY candle_time LIMIT ?", (series_id, since, limit)
            )
            return [r.candle for r in rows]

        return await self._read(q)

    async def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        """Candles with ``start <= candle_time < end``, ascending, with source and mark."""
        return await self._read(
            lambda conn: _select(
                conn,
                "candle_time >= ? AND candle_time < ? ORDER BY candle_time",
                (series_id, start, end),
            )
        )

    async def head_time(self, series_id: str) -> int | None:
        return await self._read(lambda conn: _head_time(conn, series_id))

    async def heads(self) -> dict[str, SeriesHead]:
        """Head, first time and count of every stored series."""

        def q(conn: sqlite3.Connection) -> dict[str, SeriesHead]:
            cur = conn.execute(
                "SELECT series_id, MAX(candle_time), MIN(candle_time), COUNT(*)"
                " FROM candles GROUP BY series_id"
            )
            return {r[0]: SeriesHead(r[0], int(r[1]), int(r[2]), int(r[3])) for r in cur}

        return await self._read(q)

    async def get_meta(self, key: str) -> str | None:
        def q(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._read(q)
