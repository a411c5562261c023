"""CandleStore: every candle on SQLite, exactly as received (DESIGN §4).

One table keyed by ``(series_id, candle_time)`` holds the decimal text of each price and
volume, the optional Binance extras, the ``source`` and a ``complete`` mark for derived
candles. WAL journal with ``synchronous=FULL``: a committed batch survives a power cut.

Concurrency: one writer connection behind a ``CapacityLimiter(1)`` and a small pool of
reader connections behind their own limiter, used from worker threads through
``trio.to_thread.run_sync`` — except a *quick* write, whose transaction runs on the event
loop's thread up to its ``COMMIT`` (see :meth:`CandleStore.write`). Under WAL a reader
sees the last commit and never waits behind a long write. :meth:`CandleStore.write` runs a
whole function in one transaction, so the pipeline commits base and derived candles of a
batch together or not at all. WAL checkpoints run after writes on a thread and connection
of their own (:mod:`tradecanvas.store.checkpoint`), not inside a ``COMMIT``.

Raises :class:`StoreError` for any SQLite failure (disk full, read-only, corrupt file).
"""

from __future__ import annotations

import functools
import logging
import os
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, TypeVar, final

import trio

from tradecanvas.errors import StoreError, store_errors_from
from tradecanvas.model import Candle
from tradecanvas.store import files
from tradecanvas.store.checkpoint import BACKSTOP_PAGES, Checkpointer
from tradecanvas.store.schema import SCHEMA_VERSION, SchemaChange, migrate
from tradecanvas.store.txn import (
    StoreTxn,
    events_newest_id,
    events_pruned_upto,
    head_time,
    select_candles,
    select_events,
)
from tradecanvas.store.types import (
    SeriesHead,
    Source,
    StoredCandle,
    StoredEvent,
    UpsertOutcome,
)
from tradecanvas.store.window import WindowReads
from tradecanvas.store.writer_lock import FileLock

# Readers run in parallel threads; two cores here, and reads are short index range scans.
log = logging.getLogger(__name__)

READER_CONNECTIONS: Final = 4
# how often the daemon checks that the path still names the open file (CandleStore.watch_file)
FILE_CHECK_INTERVAL_S: Final = 2.0
# how long a connection waits for another's lock before SQLITE_BUSY
BUSY_TIMEOUT_MS: Final = 30_000
# the writer's page cache (KiB; SQLite's default is 2,000): a live batch writes at the end of
# every series it holds, one leaf page per series and timeframe (400 symbols with 5m derived:
# 800 pages, more than the default holds), and a page that fell out of the cache is read
# back for each row written to it (a fifth of the writer's CPU time in the commit
# benchmark). Only the pages used are allocated.
WRITER_CACHE_KIB: Final = 65_536
# SQLITE_BUSY and its extended codes (another connection holds the lock)
_BUSY: Final = frozenset({5, 261, 517, 773})
T = TypeVar("T")


def _translated(what: str) -> store_errors_from:
    """Translate sqlite3 errors into StoreError at the store's edge."""
    return store_errors_from(sqlite3.Error, what)


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_MS / 1e3
    )  # autocommit mode: transactions are explicit
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    return conn


def _begin_now(conn: sqlite3.Connection) -> bool:
    """``BEGIN IMMEDIATE`` without waiting (the writer's ``busy_timeout`` is 0): False when
    another connection holds the write lock."""
    try:
        conn.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError as exc:
        if exc.sqlite_errorcode in _BUSY and not conn.in_transaction:
            return False
        raise
    return True


def _begin_waiting(conn: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, waiting up to BUSY_TIMEOUT_MS for the write lock (on a worker
    thread)."""
    conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    try:
        conn.execute("BEGIN IMMEDIATE")
    finally:
        conn.execute("PRAGMA busy_timeout = 0")


def _commit(conn: sqlite3.Connection) -> None:
    with _translated("write"):
        try:
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


def _rollback(conn: sqlite3.Connection) -> None:
    if conn.in_transaction:
        conn.execute("ROLLBACK")


def _open_writer(
    path: Path, *, writes: bool = True, lock: bool = False
) -> tuple[sqlite3.Connection, SchemaChange, FileLock | None]:
    """The writer connection, what its migration did, and the single-writer lock (taken
    with ``lock``, before anything is migrated or written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # the folder of the file ``path`` leads to: the lock and the -wal and -shm files are there
    folder = Path(os.path.realpath(path)).parent
    if (exposed := files.exposed_folder(folder)) is not None:
        log.warning("candle store %s: its folder %s %s", path, folder, exposed)
    # SQLite opens a file it may not write (another owner, chattr +i, a read-only mount)
    # read-only without a word, and the first commit failed instead
    if writes and path.exists() and not os.access(path, os.W_OK):
        raise StoreError(
            f"candle store {path} cannot be written by this process (uid {os.getuid()}):"
            " give the file and its folder to the user the daemon runs as"
        )
    # SQLite's word for these is a bare "attempt to write a readonly database"
    if writes and (part := files.unwritable_part(path)) is not None:
        raise StoreError(
            f"candle store {path}: {part} cannot be written by this process (uid"
            f" {os.getuid()}): give the file and its folder to the user the daemon runs as"
        )
    held = FileLock.take(path) if lock else None
    if not path.exists() and lock:  # a daemon: its history was expected there
        log.warning(
            "candle store %s: no file there; created a new, empty store (history comes"
            " from the backfill; to keep older history, stop and restore a backup here)",
            path,
        )
    elif not path.exists():  # a one-shot tool (import, backfill) filling a new store
        log.info("candle store %s: no file there; created a new, empty store", path)
    try:
        conn = _connect(path)
    except BaseException:
        if held is not None:
            held.release()
        raise
    try:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise StoreError(f"candle store {path}: cannot use WAL journal (got {mode})")
        conn.execute("PRAGMA synchronous = FULL")
        # checkpoints run off the commit path (store.checkpoint); this is only a backstop
        conn.execute(f"PRAGMA wal_autocheckpoint = {BACKSTOP_PAGES}")
        conn.execute(f"PRAGMA cache_size = -{WRITER_CACHE_KIB}")
        # the statement journal of write_rows' multi-row INSERT (a CHECK may abort it
        # halfway) stays in memory instead of a file in /var/tmp (docs/benchmarks.md, Commit)
        conn.execute("PRAGMA temp_store = MEMORY")
        conn.execute("PRAGMA foreign_keys = ON")
        change = migrate(conn, str(path))
        # a damaged page answers a line saying where, not an error
        (verdict,) = conn.execute("PRAGMA quick_check(1)").fetchone()
        if verdict != "ok":
            raise StoreError(
                f"candle store {path} failed its integrity check ({verdict}): restore a"
                f" backup, or recover what is left with: sqlite3 {path} .recover"
            )
        # the writer waits for another process's write lock only on a worker thread, in
        # _begin_waiting; everywhere else it must not block (see CandleStore.write)
        conn.execute("PRAGMA busy_timeout = 0")
    except BaseException:
        conn.close()
        if held is not None:
            held.release()
        raise
    return conn, change, held


@final
class CandleStore(WindowReads):
    """Owns the SQLite file and its connections. Open with :meth:`open`, close with
    :meth:`aclose`. Every method is a trio checkpoint and runs SQLite in a worker thread."""

    placeholder = "?"

    def __init__(self, path: Path, writer: sqlite3.Connection) -> None:
        self.path = path
        self._writer = writer
        self._write_limiter = trio.CapacityLimiter(1)
        self._checkpointer = Checkpointer(functools.partial(_connect, path))
        self._readers: list[sqlite3.Connection] = []
        self._read_limiter = trio.CapacityLimiter(READER_CONNECTIONS)
        self._closed = False
        self._write_started: float | None = None
        # StoreTxn.sequence: write transactions so far, plus one per change seen from
        # elsewhere (``PRAGMA data_version`` moves when another connection committed)
        self._sequence = 0
        self._data_version: int | None = None
        self._identity: tuple[int, int] | None = None  # the file's (device, inode)
        self._wal_identity: tuple[int, int] | None = None  # its -wal's, open with it
        self.schema: SchemaChange | None = None  # what opening it did to its schema
        self.lock: FileLock | None = None  # serve's single-writer lock, let go by aclose

    def write_running_for(self) -> float:
        """Seconds the write in flight has been running (0 when idle): the watchdog's view
        of whether the pipeline makes progress."""
        started = self._write_started
        return 0.0 if started is None else trio.current_time() - started

    @property
    def closed(self) -> bool:
        return self._closed

    @classmethod
    async def open(
        cls, path: Path | str, *, writes: bool = True, lock: bool = False
    ) -> CandleStore:
        """Open (and migrate) the store; ``writes=False``: the caller only reads (export),
        so a file it may not write is not refused. ``lock``: take the single-writer lock
        first (``serve`` when it ingests; StoreInUse when another process holds it)."""
        path = Path(path)
        opened: list[tuple[SchemaChange, FileLock | None]] = []

        def _open() -> tuple[sqlite3.Connection, tuple[int, int], tuple[int, int] | None]:
            try:
                with _translated(f"open of {path}"):
                    conn, change, held = _open_writer(path, writes=writes, lock=lock)
                    opened.append((change, held))
            except (FileExistsError, NotADirectoryError) as exc:
                # mkdir of the folder met a file on the way ("File exists")
                blocker = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
                what = f"{blocker} is a file, not a folder" if blocker else str(exc)
                raise StoreError(f"candle store open of {path} failed: {what}") from exc
            except (OSError, StoreError) as exc:
                # SQLite's own failure (not one of the checks above): on a full disk it says
                # "disk I/O error" of a store that exists (its -shm cannot grow), which
                # reads as failing hardware
                ours = isinstance(exc, StoreError) and exc.__cause__ is None
                full = None if ours else files.full_disk(path.parent)
                if isinstance(exc, StoreError) and full is None:
                    raise
                cause = exc.__cause__ if isinstance(exc, StoreError) else exc
                what = str(exc) if full is None else f"{full} ({type(cause).__name__}: {cause})"
                raise StoreError(f"candle store open of {path} failed: {what}") from exc
            wal = Path(f"{path}{files.WAL_SUFFIX}")
            try:
                return conn, files.identity(path), files.identity(wal) if wal.exists() else None
            except BaseException:
                conn.close()
                if held is not None:
                    held.release()
                raise

        conn, identity, wal_identity = await trio.to_thread.run_sync(_open)
        store = cls(path, conn)
        store._identity, store._wal_identity = identity, wal_identity
        store.schema, store.lock = opened[0]
        return store

    def checkpoint_failures(self) -> int:
        """WAL checkpoints that failed since the store opened (a full disk, a lock)."""
        return self._checkpointer.failures

    def disk_space(self) -> files.DiskSpace:
        """The room on the store's file system (blocking; raises OSError)."""
        return files.disk_space(self.path.parent)

    def file_problem(self) -> str | None:
        """Why the path no longer names the file this store has open — deleted, or replaced
        (a ``mv`` over it, a restore while running): what is committed from then on would
        go to a file nobody can open again; the same of its ``-wal`` file. None while both
        still do."""
        wal = f"{self.path}{files.WAL_SUFFIX}"
        for path, known, name in (
            (self.path, self._identity, ""),
            # the WAL holds what was committed since the last checkpoint: deleted, that
            # goes with this process, and another process opening the store starts anew
            (wal, self._wal_identity, f"lost its {files.WAL_SUFFIX} file: {wal} "),
        ):
            if known is None:
                continue
            try:
                now = files.identity(path)
            except FileNotFoundError:
                return f"{name}was deleted while the daemon had it open"
            except OSError as exc:
                return f"{name}cannot be checked: {exc}"
            if now != known:
                return f"{name}was replaced by another file while the daemon had it open"
        return None

    async def watch_file(self, interval_s: float = FILE_CHECK_INTERVAL_S) -> None:
        """Raise StoreError once :meth:`file_problem` finds one (the daemon then stops with
        exit code 3 before another commit is lost; a restart opens what is there now); a
        WARNING when the lock file was deleted or replaced (:meth:`FileLock.problem`)."""
        while not self._closed:
            problem = self.file_problem()
            if problem is not None:
                raise StoreError(
                    f"candle store {self.path} {problem}; stopping before anything more is"
                    " committed to it"
                )
            if self.lock is not None:
                self.lock.check(self.path)
            await trio.sleep(interval_s)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        async with self._write_limiter:
            conns = [self._writer, *self._readers]
            self._readers.clear()

            def _close_all() -> None:
                self._checkpointer.close()
                for conn in conns:
                    conn.close()
                if self.lock is not None:  # after the last commit
                    self.lock.release()

            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(_close_all)

    async def write(self, fn: Callable[[StoreTxn], T], *, quick: bool = False) -> T:
        """Run ``fn`` in one ``BEGIN IMMEDIATE`` transaction.

        An exception rolls everything back and propagates (SQLite errors as StoreError).
        The commit is shielded from cancellation: a batch is all in or all out.

        Everything runs on a worker thread, unless ``quick`` (the caller knows ``fn`` is
        short: a live batch, not a history): then ``BEGIN`` and ``fn`` run on the event
        loop's own thread, and only the ``COMMIT`` (its fsync) on a worker thread. ``fn``
        is Python that holds the GIL either way; on a worker thread it also gives the GIL
        away and waits to get it back around every statement (each row of an
        ``executemany``, as ``write_rows`` was then), up to the interpreter's switch
        interval each time the event loop is busy — that, not the SQL, was most of a live
        commit's time. ``BEGIN``
        never waits on the event loop's thread: when another process holds the write
        lock, it waits on a worker thread (``busy_timeout``), and ``fn`` runs after.
        """
        if self._closed:
            raise StoreError("candle store is closed")
        conn = self._writer

        def _run() -> T:
            with _translated("write"):
                _begin_waiting(conn)
                try:
                    result = fn(StoreTxn(conn, self._next_sequence(conn)))
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback(conn)
                    raise
                return result

        # Shielded from the wait for the writer on: a caller that already took candles out
        # of its buffer must not lose them to a cancellation while another write runs.
        # Writes are short, so the shield is bounded in practice.
        with trio.CancelScope(shield=True):
            async with self._write_limiter:
                self._write_started = trio.current_time()
                try:
                    if quick:
                        result = await self._write_quick(conn, fn)
                    else:
                        result = await trio.to_thread.run_sync(_run)
                finally:
                    self._write_started = None
                self._checkpointer.after_write()
        return result

    async def _write_quick(self, conn: sqlite3.Connection, fn: Callable[[StoreTxn], T]) -> T:
        with _translated("write"):
            if not _begin_now(conn):
                await trio.to_thread.run_sync(_begin_waiting, conn)
            try:
                result = fn(StoreTxn(conn, self._next_sequence(conn)))
            except BaseException:
                _rollback(conn)
                raise
        await trio.to_thread.run_sync(_commit, conn)
        return result

    def _next_sequence(self, conn: sqlite3.Connection) -> int:
        """Number a write transaction (see StoreTxn.sequence); under the write lock."""
        version = int(conn.execute("PRAGMA data_version").fetchone()[0])
        if version != self._data_version:
            self._data_version = version
            self._sequence += 1
        self._sequence += 1
        return self._sequence

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

    async def select(self, where: str, params: tuple[object, ...]) -> list[StoredCandle]:
        """The rows of ``series_id = ? AND <where>`` (WindowReads' query)."""
        return await self._read(lambda conn: select_candles(conn, where, params))

    async def head_time(self, series_id: str) -> int | None:
        return await self._read(lambda conn: head_time(conn, series_id))

    async def heads(self) -> dict[str, SeriesHead]:
        """Head, first time and count of every stored series."""

        def q(conn: sqlite3.Connection) -> dict[str, SeriesHead]:
            cur = conn.execute(
                "SELECT series_id, MAX(candle_time), MIN(candle_time), COUNT(*)"
                " FROM candles GROUP BY series_id"
            )
            return {r[0]: SeriesHead(r[0], int(r[1]), int(r[2]), int(r[3])) for r in cur}

        return await self._read(q)

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = 1000
    ) -> list[StoredEvent]:
        """Up to ``limit`` events with ``event_id > after`` (of ``series_ids`` when given),
        ascending."""
        return await self._read(lambda conn: select_events(conn, after, series_ids, limit))

    async def events_pruned_upto(self) -> int:
        """The highest event_id the retention dropped (0: none): a cursor below it has lost
        events."""
        return await self._read(events_pruned_upto)

    async def events_newest_id(self) -> int:
        """The highest event_id ever given (0: none), pruned or not: a cursor above it
        comes from another log (a store restored from an older backup)."""
        return await self._read(events_newest_id)

    async def set_meta(self, key: str, value: str) -> None:
        await self.write(lambda txn: txn.set_meta(key, value))

    async def get_meta(self, key: str) -> str | None:
        def q(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            return None if row is None else str(row[0])

        return await self._read(q)


__all__ = [
    "READER_CONNECTIONS",
    "SCHEMA_VERSION",
    "CandleStore",
    "SeriesHead",
    "Source",
    "StoreTxn",
    "StoredCandle",
    "StoredEvent",
    "UpsertOutcome",
]
