"""WAL checkpoints off the commit path of the SQLite store (docs/benchmarks.md, Latency).

A checkpoint copies the WAL's pages into the database file and flushes it. Left to SQLite
(``wal_autocheckpoint``, 1,000 pages), it runs inside the ``COMMIT`` that takes the WAL past
the threshold: in the latency benchmark one live batch in eight paid it, its ``COMMIT`` 6.9
ms instead of 2.4 (median), and the closes of that batch waited for it. Here the writer's
own threshold is only a backstop (:data:`BACKSTOP_PAGES`), and :class:`Checkpointer` runs a
``PASSIVE`` checkpoint — which never waits for the writer or a reader, nor makes them wait —
on a connection and a thread of its own after a write, at most one at a time and
:data:`INTERVAL_S` apart: while the ingest publishes what it just committed, before the
next batch. Durability is the ``COMMIT``'s (the WAL is flushed there), not the checkpoint's.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Final, final

log = logging.getLogger(__name__)

# the writer's own wal_autocheckpoint: only if the checkpoints here cannot keep up
BACKSTOP_PAGES: Final = 10_000
# at most one checkpoint started this often (SQLite's threshold came every ~0.16 s of a
# 5,000 closes/s load; a write seldom waits this long for the next)
INTERVAL_S: Final = 0.1


@final
class Checkpointer:
    """Starts ``PASSIVE`` checkpoints on a connection of its own (made by ``connect`` in the
    first checkpoint's thread), each on a new thread. :meth:`after_write` never blocks;
    :meth:`close` waits for the one running, then closes the connection. A checkpoint that
    fails is logged and left to the next one (the writer's backstop remains)."""

    def __init__(self, connect: Callable[[], sqlite3.Connection]) -> None:
        self._connect = connect
        self._conn: sqlite3.Connection | None = None
        self._thread: threading.Thread | None = None
        self._started = -INTERVAL_S
        self._closed = False

    def after_write(self) -> None:
        """A write committed: start a checkpoint unless one runs, or one started less than
        INTERVAL_S ago."""
        now = time.monotonic()
        running = self._thread is not None and self._thread.is_alive()
        if self._closed or running or now - self._started < INTERVAL_S:
            return
        self._started = now
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            if self._conn is None:
                self._conn = self._connect()
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("WAL checkpoint failed (the next one retries): %s", exc)

    def close(self) -> None:
        """Wait for the checkpoint running (blocking: call it on a worker thread)."""
        self._closed = True
        if self._thread is not None:
            self._thread.join()
        if self._conn is not None:
            self._conn.close()
            self._conn = None


__all__ = ["BACKSTOP_PAGES", "INTERVAL_S", "Checkpointer"]
