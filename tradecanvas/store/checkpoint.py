"""WAL checkpoints off the commit path of the SQLite store (docs/benchmarks.md, Latency).

A checkpoint copies the WAL's pages into the database file and flushes it. Left to SQLite
(``wal_autocheckpoint``, 1,000 pages), it runs inside the ``COMMIT`` that takes the WAL past
the threshold: in the latency benchmark one live batch in eight paid it, its ``COMMIT`` 6.9
ms instead of 2.4 (median), and the closes of that batch waited for it. Here the writer's
own threshold is only a backstop (:data:`BACKSTOP_PAGES`), and :class:`Checkpointer` runs a
``PASSIVE`` checkpoint — which never waits for the writer or a reader, nor makes them wait —
after a write, on one long-lived thread and a connection of its own, one at a time, unless
one was asked for less than :data:`INTERVAL_S` before: right after a ``COMMIT``, while the
ingest publishes what it just committed, before the next batch (never at a moment of its
own, in the middle of a transaction's Python). Writes that come while a checkpoint runs ask
for one more, not one each. Durability is the ``COMMIT``'s (the WAL is flushed there), not
the checkpoint's.
"""

from __future__ import annotations

import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Final, final

from tradecanvas.ops.logs import ThrottledCount

log = logging.getLogger(__name__)

# the writer's own wal_autocheckpoint: only if the checkpoints here cannot keep up
BACKSTOP_PAGES: Final = 10_000
# at most one checkpoint started this often (SQLite's threshold came every ~0.16 s of a
# 5,000 closes/s load; a write seldom waits this long for the next)
INTERVAL_S: Final = 0.1
THREAD_NAME: Final = "wal-checkpoint"
# a failing checkpoint (a full disk) fails at every write, up to 10 times a second: one line
# per kind of failure at most this often, with the count
FAILURE_LOG_INTERVAL_S: Final = 60.0


@final
class Checkpointer:
    """Owns one daemon thread (named :data:`THREAD_NAME`, started by the first
    :meth:`after_write`) and its connection (made by ``connect`` on that thread, closed
    there when it stops), which runs ``PASSIVE`` checkpoints when writes ask for them.

    :meth:`after_write` never blocks on a checkpoint: it asks for one, unless it asked less
    than ``interval_s`` ago (then that write's pages wait for the next write's checkpoint),
    and wakes the thread if it is waiting. Requests that arrive while a checkpoint runs
    become one more checkpoint. A checkpoint that fails (``sqlite3.Error``, ``connect``
    included) is counted (:attr:`failures`), logged (one line per kind of failure at most
    every :data:`FAILURE_LOG_INTERVAL_S`, with the count) and left to the next request,
    which connects again if ``connect`` failed; nothing is raised to the writer, whose
    backstop remains. :meth:`close` blocks:
    it lets the checkpoint running finish, skips any still pending, stops and joins the
    thread.
    """

    def __init__(
        self, connect: Callable[[], sqlite3.Connection], *, interval_s: float = INTERVAL_S
    ) -> None:
        self._connect = connect
        self._interval_s = interval_s
        self._cond = threading.Condition()
        # under _cond: a write asked for a checkpoint not started yet / one runs now / the
        # thread waits for a request (only then does a write wake it) / the last request
        self._wanted = False
        self._running = False
        self._idle = False
        self._asked_at = -math.inf
        self._closed = False
        self._thread: threading.Thread | None = None
        self.failures = 0  # checkpoints that failed (written by the thread only)
        self._failure_lines: dict[str, ThrottledCount] = {}

    def after_write(self) -> None:
        """A write committed: ask for a checkpoint (never blocks on one; nothing once
        closed)."""
        now = time.monotonic()
        with self._cond:
            if self._closed or self._wanted or now - self._asked_at < self._interval_s:
                return
            self._asked_at = now
            self._wanted = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
            elif self._idle:
                # only a thread waiting for a request is woken: one running a checkpoint
                # sees the flag when it is done (a wake-up for nothing takes the GIL from
                # the writer)
                self._cond.notify()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no checkpoint is asked for or running (or the checkpointer is
        closed); False if ``timeout`` seconds passed first. For tests and tools that need
        the WAL copied now; the store never waits for it."""
        with self._cond:
            return self._cond.wait_for(
                lambda: self._closed or not (self._wanted or self._running), timeout
            )

    def close(self) -> None:
        """Let the checkpoint running finish, then stop the thread and wait for it, which
        closes its connection (blocking: call it on a worker thread). Idempotent."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        try:
            while True:
                with self._cond:
                    self._idle = True
                    self._cond.wait_for(lambda: self._closed or self._wanted)
                    self._idle = False
                    if self._closed:
                        return
                    self._wanted = False
                    self._running = True
                try:
                    if conn is None:
                        conn = self._connect()
                    conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    self._failed(str(exc))
                finally:
                    with self._cond:
                        self._running = False
                        self._cond.notify_all()
        finally:
            if conn is not None:
                conn.close()

    def _failed(self, why: str) -> None:
        self.failures += 1
        line = self._failure_lines.setdefault(why, ThrottledCount(FAILURE_LOG_INTERVAL_S))
        count = line.add(time.monotonic())
        if count is not None:
            log.warning(
                "WAL checkpoint failed (the next one retries; said at most every %.0f s):"
                " %s (%d time%s since it was last said)",
                FAILURE_LOG_INTERVAL_S,
                why,
                count,
                "" if count == 1 else "s",
            )


__all__ = ["BACKSTOP_PAGES", "FAILURE_LOG_INTERVAL_S", "INTERVAL_S", "THREAD_NAME", "Checkpointer"]
