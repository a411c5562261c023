"""Ctrl-C and SIGTERM for the commands that commit as they go (``import``, ``backfill``): the
first signal stops the work after what is in flight (what is committed stays, and the same
command again finishes); a second one exits at once."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading

import attrs
import trio

from tradecanvas.errors import ExitCode


@attrs.frozen
class StopOnSignal:
    """How one command stops: its name and what the first signal lets finish, in its words."""

    command: str  # "backfill": "tradecanvas backfill: second signal, exiting at once"
    in_flight: str  # "the page": "SIGINT: stopping after the page in flight (…)"
    log: logging.Logger  # the command's own, for that warning

    async def watch(
        self,
        work: trio.CancelScope,
        caught: list[int],
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Until cancelled: the first SIGINT/SIGTERM goes into ``caught`` and cancels
        ``work``; a second one exits the process with :meth:`ExitCode.for_signal`'s code.
        Off the main thread (a caller running the command on a worker thread) signals are
        not this run's to take: it only waits."""
        if threading.current_thread() is not threading.main_thread():
            task_status.started()
            await trio.sleep_forever()
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                if caught:
                    line = f"\ntradecanvas {self.command}: second signal, exiting at once\n"
                    sys.stderr.write(line)
                    sys.stderr.flush()
                    os._exit(ExitCode.for_signal(signum))
                caught.append(signum)
                self.log.warning(
                    "%s: stopping after %s in flight (again to exit at once)",
                    signal.Signals(signum).name,
                    self.in_flight,
                )
                work.cancel(reason="interrupted")


__all__ = ["StopOnSignal"]
