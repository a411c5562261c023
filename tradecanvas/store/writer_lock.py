"""The single-writer guard of ``serve``: one daemon ingests into a store at a time.

Two daemons ingesting into one store both write every candle and both log every event, so
subscribers got each ``gap`` twice. A daemon that ingests takes the store's lock before the
store is migrated or written, and keeps it while it runs; a second one is refused at start
with :class:`StoreInUse` (exit 3: systemd tries again, so a daemon started while the old one
still stops comes up once that one is gone). The one-shot tools (import, export,
migrate-store, fetch-archive) take no lock: they run beside a daemon.

* SQLite (roles ``all`` and ``ingest``): :class:`FileLock`, an exclusive ``flock`` on
  ``<store>.lock`` beside the file the store's path leads to (a symbolic link to the store
  is the same store), holding the holder's pid. ``flock`` is apart from SQLite's own
  ``fcntl`` byte locks, and the kernel lets go of it when the process dies: there is no
  stale lock to clean up. The lock file is this process's own (mode 0600, a regular file
  of one link, owned by the effective uid) or refused: a symbolic link or hard link put
  there by another user would have the pid written over its target, and a lock file
  another user can open lets them keep the daemon out (``flock`` needs only a read-only
  open).
* PostgreSQL (roles ``all`` and ``ingest``): :class:`PgServeLock`, a session advisory
  lock on a connection of its own, its ``application_name`` naming the holder. Role
  ``all`` takes it exclusive (``pg_try_advisory_lock``): it ingests alone. Role ``ingest``
  takes the same key shared (``pg_try_advisory_lock_shared``): every ingest node holds it,
  leader and standby, and the Redis lease and its fencing token pick the one that writes
  (docs/distributed.md). So a role ``all`` daemon and the split topology's ingest nodes
  refuse each other on one database, whichever starts second (``store/lock_holder.py``
  says who holds it and the way out). A server restart ends the session and the lock with
  it: :meth:`PgServeLock.hold` notices within :data:`KEEP_INTERVAL_S` once the server
  answers again, and takes it again, or stops the daemon (StoreInUse) when a daemon it
  cannot run beside took it meanwhile. The session asks the server for TCP keepalives of
  its own (:data:`SERVER_KEEPALIVES`): a host that died (power loss, kernel panic,
  partition) sends no FIN, and without them the server kept its session, and the lock, for
  ``tcp_keepalives_idle`` (often the OS's 2 h), refusing the restarted daemon. A daemon
  that starts while quiet sessions keep it out (none ran a statement for
  :data:`QUIET_HOLDER_S`: their daemons are gone, frozen or still starting) waits up to
  :data:`HOLDER_GONE_WAIT_S` for the server to end them (:func:`take_pg_serve_lock`).
  Role ``edge`` ingests nothing and takes no lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import logging
import os
import socket
import stat
import threading
from pathlib import Path
from typing import Any, Final, final

import psycopg
import trio

from tradecanvas.errors import StoreError, StoreInUse
from tradecanvas.store.lock_holder import LockHolder, find_holder, refusal
from tradecanvas.store.pg_pool import CONNECTION_OPTIONS, describe_url, first_line

log = logging.getLogger(__name__)

LOCK_SUFFIX: Final = ".lock"
# PostgreSQL: the serve lock's advisory key (pg_schema's keys are ...0001 and ...0002),
# taken exclusive by role all, shared by role ingest
SERVE_LOCK_KEY: Final = 0x7472_6164_6563_0003
# the try of each mode, with the session it was made on (backend pid and start)
_TRY: Final = (
    "SELECT {}(%s), pg_backend_pid(), (SELECT backend_start FROM pg_stat_activity"
    " WHERE pid = pg_backend_pid())"
)
_TRY_EXCLUSIVE: Final = _TRY.format("pg_try_advisory_lock")
_TRY_SHARED: Final = _TRY.format("pg_try_advisory_lock_shared")
# how often the PostgreSQL lock's connection is checked (and the lock taken again)
KEEP_INTERVAL_S: Final = 2.0
CONNECT_TIMEOUT_S: Final = 10
# the server's keepalives on the lock's session (settings any role may set): the server
# ends the session of a peer that stopped answering (its host died without a FIN) within
# idle + interval x count = 25 s, and the lock with it. The client's own keepalives
# (CONNECTION_OPTIONS) tell this daemon of a dead server, not the server of a dead daemon.
SERVER_KEEPALIVES: Final = {
    "tcp_keepalives_idle": 10,
    "tcp_keepalives_interval": 5,
    "tcp_keepalives_count": 3,
}
# a holder whose session ran no statement for this long is taken for gone (a running daemon
# checks its lock every KEEP_INTERVAL_S): its host died and the server has not noticed yet.
# serve then waits up to HOLDER_GONE_WAIT_S, the server's keepalives' 25 s and a margin,
# for the server to end that session, rather than exit 3 at once (systemd's 5 restarts 2 s
# apart ran out before the session ended, and left the unit failed)
QUIET_HOLDER_S: Final = 3 * KEEP_INTERVAL_S
HOLDER_GONE_WAIT_S: Final = 40.0
# pg_try_advisory_lock is tried again this many times when the holder it lost to was gone
# by the time it was looked up (its session ended between the two queries)
TAKE_TRIES: Final = 3


def lock_path(store: Path) -> Path:
    """The lock file of the SQLite store at ``store``: beside the file ``store`` leads to,
    so that every path to one store (a symbolic link to it) takes the same lock."""
    return Path(f"{os.path.realpath(store)}{LOCK_SUFFIX}")


# the lock file's open: never through a symbolic link, never a terminal, never waiting (a
# FIFO); the checks of _not_own say what is refused
_OPEN_FLAGS: Final = (
    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC
)
LOCK_MODE: Final = 0o600


def _not_own(st: os.stat_result) -> str | None:
    """Why a lock file of this ``stat`` is not this process's to lock and write; None when
    it is (a regular file of one link, owned by the effective uid)."""
    if stat.S_ISLNK(st.st_mode):
        return "is a symbolic link"
    if not stat.S_ISREG(st.st_mode):
        return f"is not a regular file (a {_kind(st.st_mode)})"
    if st.st_uid != os.geteuid():
        return f"is owned by uid {st.st_uid}, not this process's (uid {os.geteuid()})"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} hard links (a lock file has one)"
    return None


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "folder"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return f"file of mode {mode:o}"


@final
class FileLock:
    """An exclusive ``flock`` on a SQLite store's lock file, held until :meth:`release`
    (or the process's end)."""

    def __init__(self, fd: int, path: Path, identity: tuple[int, int]) -> None:
        self._fd: int | None = fd
        self.path = path
        self._identity = identity  # the locked file's (device, inode)
        self._warned: str | None = None  # what check last said

    @classmethod
    def take(cls, store: Path) -> FileLock:
        """Take the lock of the store at ``store`` without waiting (blocking I/O: a worker
        thread). Raises StoreInUse when another process holds it, StoreError when the lock
        file cannot be opened or is not this process's own (:func:`_not_own`)."""
        path = lock_path(store)
        real = str(path)[: -len(LOCK_SUFFIX)]
        where = f"candle store {store}"
        if real != os.path.abspath(store):
            where += f" (the file {real})"

        def refused(why: str) -> StoreError:
            return StoreError(
                f"{where}: its lock file {path} {why}; refused (remove it: serve makes its"
                " own, mode 0600)"
            )

        try:
            if (why := _not_own(os.lstat(path))) is not None:
                raise refused(why)  # not opened: a FIFO or device is never touched
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StoreError(f"{where}: cannot check its lock file {path}: {_said(exc)}") from exc
        try:
            fd = os.open(path, _OPEN_FLAGS, LOCK_MODE)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # made a symbolic link since the check
                raise refused("is a symbolic link") from None
            raise StoreError(f"{where}: cannot open its lock file {path}: {_said(exc)}") from exc
        try:
            st = os.fstat(fd)
            if (why := _not_own(st)) is not None:
                raise refused(why)
            if stat.S_IMODE(st.st_mode) != LOCK_MODE:  # an older release's 0644
                os.fchmod(fd, LOCK_MODE)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _recorded_pid(fd)
            os.close(fd)
            pid = "" if holder is None else f" (pid {holder})"
            raise StoreInUse(
                f"{where} is in use by another tradecanvas serve{pid}, which holds {path}:"
                " one daemon ingests into a SQLite store at a time; stop that one first"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise StoreError(f"{where}: cannot lock its lock file {path}: {_said(exc)}") from exc
        except BaseException:
            os.close(fd)
            raise
        with contextlib.suppress(OSError):  # the pid is for the message only
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return cls(fd, path, _identity(st))

    def check(self, store: Path) -> None:
        """A WARNING when :meth:`problem` finds one, once for each it finds."""
        problem = self.problem()
        if problem is not None and problem != self._warned:
            log.warning(
                "candle store %s: %s while the daemon holds it: another serve could start on"
                " this store (restart this one to make it again)",
                store,
                problem,
            )
        self._warned = problem

    def problem(self) -> str | None:
        """Why the lock file's path no longer names the file this lock holds (deleted, or
        replaced): another daemon could then take a lock of its own there. None while it
        does, or once released."""
        if self._fd is None:
            return None
        try:
            now = _identity(os.stat(self.path))
        except FileNotFoundError:
            return f"its lock file {self.path} was deleted"
        except OSError as exc:
            return f"its lock file {self.path} cannot be checked: {_said(exc)}"
        if now != self._identity:
            return f"its lock file {self.path} was replaced by another file"
        return None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Let go of the lock (closing the file does it); the file stays."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


def _identity(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _said(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _recorded_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _application_name() -> str:
    return f"tradecanvas serve pid {os.getpid()} on {socket.gethostname()}"[:63]


@final
class PgServeLock:
    """The advisory lock of ``serve`` on a PostgreSQL store, on a connection of its own:
    exclusive for role ``all``, ``shared`` for role ``ingest`` (module docstring). Take
    with :meth:`take`, keep with :meth:`hold`, let go with :meth:`close`."""

    def __init__(
        self,
        url: str,
        conn: psycopg.Connection[tuple[object, ...]] | None,
        *,
        shared: bool = False,
    ) -> None:
        self._url = url
        self.shared = shared
        self.where = describe_url(url)
        self._conn = conn
        # the lock's session: its backend pid and backend_start. A pid alone is not it: after
        # a server restart another daemon's session can get the pid this one's had.
        self._backend: object = None
        self._backend_start: object = None
        self._lost = False  # an outage was logged (once) and the lock is not held again yet
        # close() wins over a keep() still running on its thread (hold() abandons it at
        # shutdown): a connection that keep() made is kept only under this lock, not closed
        self._guard = threading.Lock()
        self._closed = False

    @classmethod
    def take(cls, url: str, *, shared: bool = False) -> PgServeLock:
        """Connect and take the lock (blocking: a worker thread), ``shared`` for role
        ingest. Raises StoreInUse when a daemon this one cannot run beside holds it,
        StoreError when the server cannot be reached."""
        lock = cls(url, None, shared=shared)
        try:
            conn = lock._connect()
        except psycopg.Error as exc:
            raise StoreError(
                f"candle store open of {lock.where} failed: {first_line(exc)}"
            ) from exc
        if not lock._take_on(conn):  # no own session yet: only a holder that kept vanishing
            raise StoreInUse(
                f"candle store {lock.where}: its serve lock was held, by a session that ended"
                " each time it was looked up; try again"
            )
        return lock

    def _connect(self) -> psycopg.Connection[tuple[object, ...]]:
        server = " ".join(f"-c {name}={value}" for name, value in SERVER_KEEPALIVES.items())
        options: dict[str, Any] = {
            **CONNECTION_OPTIONS,
            "application_name": _application_name(),
            "options": f"{CONNECTION_OPTIONS['options']} {server}",
        }
        return psycopg.connect(
            self._url, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **options
        )

    def _take_on(self, conn: psycopg.Connection[tuple[object, ...]]) -> bool:
        """Take the lock on ``conn`` (kept as the lock's connection); False when this
        process's own earlier session still holds it (a network cut the server has not
        noticed yet), or when the holder's session kept ending between the try and the look
        at who holds it: tried again later. Raises StoreInUse when another session holds
        it in a mode that keeps this one out, StoreError when ``conn`` fails (both close
        ``conn``)."""
        holder: LockHolder | None = None
        try:
            for _ in range(TAKE_TRIES):
                row = conn.execute(
                    _TRY_SHARED if self.shared else _TRY_EXCLUSIVE, (SERVE_LOCK_KEY,)
                ).fetchone()
                if row is not None and row[0] is True:
                    with self._guard:
                        if not self._closed:
                            self._conn, self._backend = conn, row[1]
                            self._backend_start = row[2]
                            return True
                    conn.close()  # closed meanwhile: its session would hold the lock on
                    return False
                holder = self._holder(conn, self.shared)
                if holder is not None:
                    break
        except psycopg.Error as exc:
            conn.close()
            raise StoreError(f"candle store {self.where}: {first_line(exc)}") from exc
        conn.close()
        if holder is None:  # freed each time before it was looked up: not another daemon's
            return False
        if self._backend_start is not None and holder.session == (
            self._backend,
            self._backend_start,
        ):
            return False
        refused = StoreInUse(refusal(self.where, holder, shared=self.shared))
        refused.quiet_s = holder.quiet_s
        raise refused

    @staticmethod
    def _holder(conn: psycopg.Connection[tuple[object, ...]], shared: bool) -> LockHolder | None:
        """The session that keeps a taker (``shared`` or not) out, the least quiet of them;
        None when nobody does now (``store/lock_holder.py``)."""
        return find_holder(conn, SERVE_LOCK_KEY, shared=shared)

    @property
    def held(self) -> bool:
        return self._conn is not None and not self._conn.closed

    def keep(self) -> None:
        """Check the lock's connection (blocking); when it broke (a server restart), take
        the lock again once the server answers: a failure on the way (no connection, a
        session ended at once) is tried again at the next call, with one WARNING for the
        outage. Raises StoreInUse when another daemon took it meanwhile."""
        conn = self._conn
        if self._stopped():
            return
        if conn is not None and not conn.closed:
            try:
                conn.execute("SELECT 1")
                return
            except psycopg.Error as exc:
                if self._stopped():  # close() closed it under this call
                    return
                self._note_lost(f"its connection broke ({first_line(exc)})")
                conn.close()
        self._conn = None
        try:
            conn = self._connect()
        except psycopg.Error as exc:
            self._note_lost(f"cannot connect ({first_line(exc)})")
            return  # the server is away (the store says so); tried again next time
        try:
            if not self._take_on(conn):
                return  # our old session's backend still holds it; its end frees it
        except StoreInUse as exc:
            exc.running = True
            raise
        except StoreError as exc:  # the session ended right after the connect (a restart)
            self._note_lost(str(exc))
            return
        self._lost = False
        log.warning("candle store %s: serve lock taken again", self.where)

    def _stopped(self) -> bool:
        """:meth:`close` was called (on another thread, maybe, since the last look)."""
        return self._closed

    def _note_lost(self, why: str) -> None:
        if not self._lost:
            self._lost = True
            log.warning(
                "candle store %s: the serve lock is not held: %s; taking it again once the"
                " server answers",
                self.where,
                why,
            )

    async def hold(self, interval_s: float = KEEP_INTERVAL_S) -> None:
        """Keep the lock while the daemon runs (its nursery): raises StoreInUse when it was
        lost to another daemon, which stops this one (exit 3)."""
        while True:
            await trio.sleep(interval_s)
            await trio.to_thread.run_sync(self.keep, abandon_on_cancel=True)

    def close(self) -> None:
        """Let go of the lock (ending its session does it), for good: a :meth:`keep` still
        running (abandoned by :meth:`hold`) takes it no more."""
        with self._guard:
            self._closed = True
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


async def take_pg_serve_lock(
    url: str,
    *,
    shared: bool = False,
    quiet_s: float | None = None,
    wait_s: float | None = None,
) -> PgServeLock:
    """:meth:`PgServeLock.take` (``shared``: role ingest), waiting up to ``wait_s`` when
    every session keeping it out has been quiet for ``quiet_s`` or more: a daemon whose
    host died (its session ends within about 25 s of the server's keepalives) or is frozen
    (never ended: refused after the wait, the message says how to end it). A holder that
    answers its checks is refused at once. Defaults: :data:`QUIET_HOLDER_S`,
    :data:`HOLDER_GONE_WAIT_S`."""
    quiet_s = QUIET_HOLDER_S if quiet_s is None else quiet_s
    wait_s = HOLDER_GONE_WAIT_S if wait_s is None else wait_s
    deadline = trio.current_time() + wait_s
    waiting = False
    while True:
        try:
            return await trio.to_thread.run_sync(
                functools.partial(PgServeLock.take, url, shared=shared)
            )
        except StoreInUse as exc:
            quiet = exc.quiet_s
            if quiet is None or quiet < quiet_s:
                raise
            if trio.current_time() >= deadline:
                exc.args = (
                    f"{exc}; waited {wait_s:.0f} s for the server to end that session: if"
                    " no such daemon runs (frozen, or its host is gone), end it with"
                    " pg_terminate_backend (docs/operations.md, troubleshooting)",
                )
                raise
            if not waiting:
                waiting = True
                log.warning(
                    "candle store %s: its serve lock is held by a session that ran nothing"
                    " for %.0f s (a daemon whose host died?); waiting up to %.0f s for the"
                    " server to end it",
                    describe_url(url),
                    quiet,
                    wait_s,
                )
        await trio.sleep(KEEP_INTERVAL_S)
