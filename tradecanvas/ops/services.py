"""Small pieces of the daemon's task tree (``tradecanvas.daemon``): a service run in a cancel
scope of its own, and the signals that stop the daemon."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from tradecanvas.errors import ExitCode

log = logging.getLogger("tradecanvas.daemon")


async def run_in_scope(
    scope: trio.CancelScope,
    done: trio.Event,
    service: Callable[..., Awaitable[Any]],
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run a startable service inside ``scope`` so the daemon can stop it on its own."""
    try:
        with scope:
            await service(task_status=task_status)
    finally:
        done.set()


async def wait_for_signal(stop: trio.Event) -> None:
    """Set ``stop`` at SIGTERM or SIGINT; exit at once at the second one; ignore SIGHUP."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async for signum in signals:
            if signum == signal.SIGHUP:  # often sent for a reload: it would have killed us
                log.warning("SIGHUP ignored: settings are read once, at start; restart to apply")
                continue
            if stop.is_set():
                log.warning("second %s: exiting at once", signal.Signals(signum).name)
                logging.shutdown()
                os._exit(ExitCode.for_signal(signum))
            log.info("%s: shutting down", signal.Signals(signum).name)
            stop.set()


__all__ = ["run_in_scope", "wait_for_signal"]
