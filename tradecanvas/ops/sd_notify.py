"""systemd's notify protocol over ``$NOTIFY_SOCKET``, with the plain socket module.

A ``Type=notify`` unit tells systemd what it is doing by sending ``KEY=VALUE`` lines in one
datagram to the unix socket named by ``NOTIFY_SOCKET`` (a path, or ``@name`` for the
abstract namespace). tradecanvas sends:

- ``READY=1`` once every listener is bound and the store is open (the daemon decides when);
- ``STATUS=…`` lines with the ingest state, shown by ``systemctl status``;
- ``WATCHDOG=1`` every half ``WATCHDOG_USEC`` from :func:`run_watchdog`, only while the
  event loop runs (the task is scheduled) and the pipeline makes progress;
- ``STOPPING=1`` when shutdown begins.

Without ``NOTIFY_SOCKET`` (not under systemd, or ``NotifyAccess=none``) every call is a
no-op. Sending never blocks and never raises: a notification that cannot be delivered is
logged (at most once per kind of failure) and dropped, because systemd's own rule is that a
service must not fail for want of a listener. The values come from RuntimeFlags
(``notify_socket``, ``watchdog_usec``); this module never reads the environment.
"""

from __future__ import annotations

import logging
import math
import socket
from collections.abc import Callable
from typing import Final, final

import attrs
import trio

from tradecanvas.ops.metrics import Metrics
from tradecanvas.runtime_flags import RuntimeFlags

log = logging.getLogger(__name__)

# systemd kills the unit when no WATCHDOG=1 arrives within WATCHDOG_USEC; its docs advise
# pinging at half that period so one late tick is not fatal.
WATCHDOG_FRACTION: Final = 0.5
# A tick that arrives this many intervals late means the event loop was blocked.
STALL_FACTOR: Final = 2.0


def notify_address(notify_socket: str | None) -> str | bytes | None:
    """The ``sendto`` address for ``NOTIFY_SOCKET``, or None when there is none we can use.

    ``/path`` is a filesystem socket; ``@name`` is ``\\0name`` in the abstract namespace.
    Anything else (systemd's ``vsock:`` form, a relative path) is refused with a warning.
    """
    if not notify_socket:
        return None
    if notify_socket.startswith("/"):
        return notify_socket
    if notify_socket.startswith("@") and len(notify_socket) > 1:
        return b"\0" + notify_socket[1:].encode()
    log.warning("NOTIFY_SOCKET=%r is not a unix socket path or @name; not notifying", notify_socket)
    return None


@attrs.frozen
class NotifierStatistics:
    """Datagrams handed to the kernel, sends that failed, and the last STATUS= text."""

    sent: int
    failed: int
    last_status: str | None


@final
class SdNotifier:
    """Sends notify datagrams to one ``NOTIFY_SOCKET``; owns nothing that needs closing.

    Each message opens a short-lived ``SOCK_DGRAM`` socket, sends one non-blocking datagram
    and closes it (as libsystemd's ``sd_notify`` does), so there is no lifetime to manage.
    Never raises and never blocks. With no socket every method does nothing.
    """

    def __init__(self, notify_socket: str | None, *, watchdog_usec: int | None = None) -> None:
        self._address = notify_address(notify_socket)
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None
        self._sent = 0
        self._failed = 0
        self._last_status: str | None = None
        self._warned: set[str] = set()

    @classmethod
    def from_flags(cls, flags: RuntimeFlags) -> SdNotifier:
        """The daemon's notifier: ``NOTIFY_SOCKET`` and ``WATCHDOG_USEC`` as RuntimeFlags
        read them."""
        return cls(flags.notify_socket, watchdog_usec=flags.watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half of ``WATCHDOG_USEC``; None without one
        (or without a notify socket to send it to)."""
        if self._address is None or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 1_000_000 * WATCHDOG_FRACTION

    def statistics(self) -> NotifierStatistics:
        return NotifierStatistics(self._sent, self._failed, self._last_status)

    def ready(self, status: str | None = None) -> bool:
        """``READY=1`` (with an optional ``STATUS=``): start-up is complete."""
        return self.send("READY=1", *self._status_line(status))

    def status(self, text: str) -> bool:
        """``STATUS=<text>``: one line of state for ``systemctl status``."""
        return self.send(*self._status_line(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: the service is alive and making progress."""
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun (systemd now waits up to TimeoutStopSec)."""
        return self.send("STOPPING=1", *self._status_line(status))

    def _status_line(self, text: str | None) -> list[str]:
        if text is None:
            return []
        # one datagram carries newline-separated assignments, so a newline in the text
        # would start a new one (e.g. a series name ending in "\nREADY=1")
        clean = " ".join(text.split())
        self._last_status = clean
        return [f"STATUS={clean}"]

    def send(self, *assignments: str) -> bool:
        """Send ``assignments`` as one datagram. True when it was handed to the kernel."""
        if self._address is None or not assignments:
            return False
        payload = "\n".join(assignments).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, self._address)
        except OSError as exc:
            self._failed += 1
            kind = type(exc).__name__
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning(
                    "systemd notify failed (%s: %s); further %s not logged", kind, exc, kind
                )
            return False
        self._sent += 1
        return True


async def run_watchdog(
    notifier: SdNotifier,
    *,
    interval_s: float,
    is_progressing: Callable[[], bool],
    metrics: Metrics | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Send ``WATCHDOG=1`` every ``interval_s`` while the daemon makes progress.

    The ping comes from this task, so a blocked event loop sends none. ``is_progressing``
    is asked at each tick (e.g. "no flush has been pending for longer than X"); while it
    answers False no ping is sent, and systemd restarts the unit after ``WatchdogSec``.
    Runs until cancelled. With a disabled notifier the pings are no-ops, so the caller
    need not special-case it. ``started()`` is called after the first tick.

    With ``metrics``, ``tradecanvas_watchdog_last_ping_age_seconds`` reads the seconds since
    the last ``WATCHDOG=1`` handed to the kernel (trio's clock, at each scrape; NaN before
    the first one, and when read outside the event loop).
    """
    if interval_s <= 0:
        raise ValueError(f"watchdog interval must be positive, got {interval_s}")
    stuck = False
    last_ping: float | None = None

    def ping_age() -> float:
        if last_ping is None:
            return math.nan
        try:
            return trio.current_time() - last_ping
        except RuntimeError:  # scraped outside the event loop
            return math.nan

    if metrics is not None:
        metrics.watchdog_last_ping_age_seconds.set_function(ping_age)

    def tick() -> None:
        nonlocal stuck, last_ping
        if not is_progressing():
            if not stuck:
                log.error("pipeline is not making progress: withholding the systemd watchdog ping")
            stuck = True
            return
        if stuck:
            log.warning("pipeline is making progress again: watchdog pings resumed")
            stuck = False
        if notifier.watchdog():
            last_ping = trio.current_time()

    tick()
    task_status.started()
    last = trio.current_time()
    while True:
        await trio.sleep(interval_s)
        now = trio.current_time()
        if now - last > interval_s * STALL_FACTOR:
            log.warning(
                "event loop was blocked: watchdog tick %.1f s late", now - last - interval_s
            )
        last = now
        tick()
