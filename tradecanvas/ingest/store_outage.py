"""The store stops taking writes while the daemon runs — the disk is full, the file system
turned read-only, another process holds the write lock past the busy timeout — and the
ingest cannot commit.

The daemon used to stop at once (exit 3) and systemd restarted it; on a disk that stays
full the restarts failed in turn, and after five in five minutes the unit stayed failed
until someone ran ``systemctl reset-failed``, with no chart and no history read meanwhile.
Now :meth:`StoreOutage.run_ingest` runs the ingest supervisor, and when it ends with such a
store failure (after it started: a failure at start-up still stops the daemon) it:

- logs it once (CRITICAL), stops ingesting (what the failed batch held was rolled back; the
  restart repairs it over REST, as after any restart), and says so on ``/readyz``
  (``store_writable`` false) — the HTTP and WS reads go on serving what is stored;
- every :data:`PROBE_INTERVAL_S`, checks that a SQLite store's file system has room for
  the restart's writes (:func:`~tradecanvas.store.files.short_of_room`: SQLite reuses an
  old WAL from its start, so a small write goes through on a disk with no byte free, and
  the restart that followed failed again at once), then tries a small write;
- once both go through, raises :class:`StoreError` saying so: the daemon stops with exit
  code 3, and systemd's one restart is the recovery — it repairs the hole from Binance REST.

A failure that waiting does not cure (a damaged file, a fenced-off ingest node) is raised at
once, as before. Nothing here is lost either way: what was committed stays, and the rest
comes back over REST.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final, final

import trio

from tradecanvas.errors import StoreError, StoreRecovered, find_in_group
from tradecanvas.store.files import DiskSpace, short_of_room
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.sqlite import CandleStore

log = logging.getLogger(__name__)

PROBE_INTERVAL_S: Final = 5.0
PROBE_KEY: Final = "store_probe"
# what a store failure says when waiting cures it: the disk (SQLite, PostgreSQL), the file
# system, a lock another process holds
_WAITS_OUT: Final = (
    "disk is full",
    "no space left",
    "readonly",
    "read-only",
    "database is locked",
    "file too large",
    # SQLite's answer to a write past the file-size limit (EFBIG), and to a disk that fails
    # for a while; one that never recovers leaves the daemon serving reads, /readyz false
    "disk i/o error",
)


def waits_out(failure: StoreError) -> bool:
    """Will a write go through again once the operator frees space or a lock?"""
    text = str(failure).lower()
    return any(marker in text for marker in _WAITS_OUT)


class _Started:
    """The task status handed to the supervisor, noting whether it started."""

    def __init__(self, inner: trio.TaskStatus[Any]) -> None:
        self.inner = inner
        self.done = False

    def started(self, value: Any = None) -> None:
        self.done = True
        self.inner.started(value)


@final
class StoreOutage:
    """Runs the ingest through a store outage (module docstring)."""

    def __init__(
        self,
        store: MarketStore,
        *,
        probe_interval_s: float = PROBE_INTERVAL_S,
        disk_space: Callable[[], DiskSpace] | None = None,
    ) -> None:
        self.store = store
        self.probe_interval_s = probe_interval_s
        self.failure: str | None = None  # while the store takes no writes
        # the room on a SQLite store's file system (PostgreSQL's disk is the server's)
        if disk_space is None and isinstance(store, CandleStore):
            disk_space = store.disk_space
        self.disk_space = disk_space

    def writable(self) -> bool:
        return self.failure is None

    async def run_ingest(
        self,
        run: Callable[..., Awaitable[None]],
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        status = _Started(task_status)
        try:
            await run(task_status=status)
        except BaseException as exc:
            failure = find_in_group(exc, StoreError)
            only = isinstance(exc, StoreError) or (
                isinstance(exc, BaseExceptionGroup) and exc.split(StoreError)[1] is None
            )
            if failure is None or not only or not status.done or not waits_out(failure):
                raise
            self.failure = str(failure)
            log.critical(
                "store failure, ingest stopped: %s; serving what is stored, trying a write"
                " every %.0f s, then restarting (exit code 3) to repair what was missed",
                failure,
                self.probe_interval_s,
            )
            await self._until_writable()
            raise StoreRecovered(
                "the store takes writes again after the outage: this restart is the"
                " recovery (it repairs the minutes missed from Binance REST)"
            ) from failure

    async def _until_writable(self) -> None:
        room_said = False
        while True:
            await trio.sleep(self.probe_interval_s)
            short = await self._short_of_room()
            if short is not None:
                if not room_said:
                    log.warning("store outage: %s before restarting; still waiting", short)
                    room_said = True
                continue
            try:
                await self.store.set_meta(PROBE_KEY, f"{time.time():.3f}")
            except StoreError as exc:
                log.debug("store still takes no writes: %s", exc)
                continue
            return

    async def _short_of_room(self) -> str | None:
        """Why the store's file system has too little room (None: enough, or not known)."""
        if self.disk_space is None:
            return None
        try:
            space = await trio.to_thread.run_sync(self.disk_space)
        except OSError as exc:
            log.debug("the store's file system cannot be asked for its room: %s", exc)
            return None
        return short_of_room(space)


__all__ = ["PROBE_INTERVAL_S", "StoreOutage", "waits_out"]
