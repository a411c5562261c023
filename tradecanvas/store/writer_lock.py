"""The single-writer guard of ``serve``: one daemon ingests into a store at a time.

Two daemons ingesting into one store both write every candle and both log every event, so
subscribers got each ``gap`` twice. A daemon that ingests takes the store's lock before the
store is migrated or written, and keeps it while it runs; a second one is refused at start
with :class:`StoreInUse` (exit 3: systemd tries again, so a daemon started while the old one
still stops comes up once that one is gone). The one-shot tools (import, export,
migrate-store, fetch-archive) take no lock: they run beside a daemon.

* SQLite (roles ``all`` and ``ingest``): :class:`FileLock`, an exclusive ``flock`` on
  ``<store>.lock`` beside the file, holding the holder's pid. ``flock`` is apart from
  SQLite's own ``fcntl`` byte locks, and the kernel lets go of it when the process dies:
  there is no stale lock to clean up.
* PostgreSQL (role ``all``): :class:`PgServeLock`, a session advisory lock
  (``pg_try_advisory_lock``) on a connection of its own, its ``application_name`` naming
  the holder. A server restart ends the session and the lock with it: :meth:`PgServeLock.hold`
  notices within :data:`KEEP_INTERVAL_S` once the server answers again, and takes it again,
  or stops the daemon (StoreInUse) when another daemon took it meanwhile. Role ``ingest``
  on PostgreSQL has the Redis lease and its fencing token instead (docs/distributed.md).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import socket
from pathlib import Path
from typing import Any, Final, final

import psycopg
import trio

from tradecanvas.errors import StoreError, StoreInUse
from tradecanvas.store.pg_pool import CONNECTION_OPTIONS, describe_url, first_line

log = logging.getLogger(__name__)

LOCK_SUFFIX: Final = ".lock"
# PostgreSQL: the serve lock's advisory key (pg_schema's keys are ...0001 and ...0002)
SERVE_LOCK_KEY: Final = 0x7472_6164_6563_0003
# how often the PostgreSQL lock's connection is checked (and the lock taken again)
KEEP_INTERVAL_S: Final = 2.0
CONNECT_TIMEOUT_S: Final = 10


def lock_path(store: Path) -> Path:
    """The lock file of the SQLite store at ``store``."""
    return Path(f"{store}{LOCK_SUFFIX}")


@final
class FileLock:
    """An exclusive ``flock`` on a SQLite store's lock file, held until :meth:`release`
    (or the process's end)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd: int | None = fd
        self.path = path

    @classmethod
    def take(cls, store: Path) -> FileLock:
        """Take the lock of the store at ``store`` without waiting (blocking I/O: a worker
        thread). Raises StoreInUse when another process holds it, StoreError when the lock
        file cannot be opened."""
        path = lock_path(store)
        try:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except PermissionError:  # a lock file left by another user: read-only will do
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise StoreError(
                f"candle store {store}: cannot open its lock file {path}: {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _recorded_pid(fd)
            os.close(fd)
            pid = "" if holder is None else f" (pid {holder})"
            raise StoreInUse(
                f"candle store {store} is in use by another tradecanvas serve{pid}, which"
                f" holds {path}: one daemon ingests into a SQLite store at a time; stop that"
                " one first"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # the pid is for the message only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (closing the file does it); the file stays."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _recorded_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _application_name() -> str:
    return f"tradecanvas serve pid {os.getpid()} on {socket.gethostname()}"[:63]


def _key_parts(key: int) -> tuple[int, int]:
    """pg_locks' (classid, objid) of a bigint advisory key."""
    return key >> 32, key & 0xFFFF_FFFF


@final
class PgServeLock:
    """The advisory lock of ``serve`` role ``all`` on a PostgreSQL store, on a connection
    of its own. Take with :meth:`take`, keep with :meth:`hold`, let go with :meth:`close`."""

    def __init__(self, url: str, conn: psycopg.Connection[tuple[object, ...]] | None) -> None:
        self._url = url
        self.where = describe_url(url)
        self._conn = conn
        self._backend: object = None  # the lock's session's backend pid

    @classmethod
    def take(cls, url: str) -> PgServeLock:
        """Connect and take the lock (blocking: a worker thread). Raises StoreInUse when
        another daemon holds it, StoreError when the server cannot be reached."""
        lock = cls(url, None)
        try:
            conn = lock._connect()
        except psycopg.Error as exc:
            raise StoreError(
                f"candle store open of {lock.where} failed: {first_line(exc)}"
            ) from exc
        lock._take_on(conn)  # no own session yet: another holder is StoreInUse
        return lock

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        options: dict[str, Any] = {**CONNECTION_OPTIONS, "application_name": _application_name()}
        return psycopg.connect(
            self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **options
        )

    def _take_on(self, conn: psycopg.Connection[tuple[object, ...]]) -> bool:
        """Take the lock on ``conn`` (kept as the lock's connection); False when this
        process's own earlier session still holds it (a network cut the server has not
        noticed yet: tried again later). Raises StoreInUse when another process holds it."""
        try:
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s), pg_backend_pid()", (SERVE_LOCK_KEY,)
            ).fetchone()
            if row is not None and row[0] is True:
                self._conn, self._backend = conn, row[1]
                return True
            backend, holder = self._holder(conn)
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"candle store {self.where}: {first_line(exc)}") from exc
        conn.close()
        if backend is not None and backend == self._backend:
            return False
        raise StoreInUse(
            f"candle store {self.where} is in use by another tradecanvas serve of role all"
            f" ({holder}), which holds its serve lock: one such daemon ingests into a"
            " database at a time (several nodes: roles ingest and edge); stop that one first"
        )

    @staticmethod
    def _holder(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[object, str]:
        """The holder's backend pid and who it is."""
        classid, objid = _key_parts(SERVE_LOCK_KEY)
        row = conn.execute(
            "SELECT l.pid, a.application_name, a.client_addr::text FROM pg_locks l"
            " JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' AND l.granted"
            " AND l.classid = %s AND l.objid = %s AND l.objsubid = 1"
            " AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (classid, objid),
        ).fetchone()
        if row is None:
            return None, "holder unknown"
        backend, name, addr = row
        return backend, f"{name or 'no application_name'} from {addr or 'a local socket'}"

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def keep(self) -> None:
        """Check the lock's connection (blocking); when it broke (a server restart), take
        the lock again once the server answers. Raises StoreInUse when another daemon
        took it meanwhile."""
        conn = self._conn
        if conn is not None and not conn.closed:
            try:
                conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                log.warning(
                    "candle store %s: the serve lock's connection broke (%s); taking the"
                    " lock again once the server answers",
                    self.where,
                    first_line(exc),
                )
                conn.close()
        self._conn = None
        try:
            conn = self._connect()
        except psycopg.Error:
            return  # the server is away (the store says so); tried again next time
        try:
            if not self._take_on(conn):
                return  # our old session's backend still holds it; its end frees it
        except StoreInUse as exc:
            exc.running = True
            raise
        log.warning("candle store %s: serve lock taken again", self.where)

    async def hold(self, interval_s: float = KEEP_INTERVAL_S) -> None:
        """Keep the lock while the daemon runs (its nursery): raises StoreInUse when it was
        lost to another daemon, which stops this one (exit 3)."""
        while True:
            await trio.sleep(interval_s)
            await trio.to_thread.run_sync(self.keep, abandon_on_cancel=True)

    def close(self) -> None:
        """Let go of the lock (ending its session does it)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
