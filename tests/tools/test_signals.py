"""Ctrl-C/SIGTERM for ``import`` and ``backfill`` (``tools/signals.py``), with real signals:
the first stops the work and is kept for the exit code; a second ends the process at once.
The commands' own tests stop them this way mid-run (tests/tools/importer/test_import.py,
tests/tools/backfill/test_cli.py)."""

from __future__ import annotations

import logging
import os
import signal
import sys
import textwrap
from typing import Final

import pytest
import trio

from tradecanvas.errors import ExitCode
from tradecanvas.tools.signals import StopOnSignal

STOP: Final = StopOnSignal("backfill", "the page", logging.getLogger("tests.signals"))


async def test_the_first_signal_stops_the_work_and_is_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caught: list[int] = []
    work = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        await nursery.start(STOP.watch, work, caught)
        with work:
            os.kill(os.getpid(), signal.SIGTERM)
            await trio.sleep_forever()
        nursery.cancel_scope.cancel()
    assert work.cancelled_caught and caught == [signal.SIGTERM]
    assert caplog.messages == ["SIGTERM: stopping after the page in flight (again to exit at once)"]


# the first Ctrl-C stops the work, then what is in flight hangs (a commit that never ends)
_SECOND: Final = textwrap.dedent(
    """
    import logging, os, signal, trio
    from tradecanvas.tools.signals import StopOnSignal

    async def main():
        caught, work = [], trio.CancelScope()
        stop = StopOnSignal("import", "the transaction", logging.getLogger("import"))
        async with trio.open_nursery() as nursery:
            await nursery.start(stop.watch, work, caught)
            with work:
                os.kill(os.getpid(), signal.SIGINT)
                await trio.sleep_forever()
            os.kill(os.getpid(), signal.SIGINT)
            await trio.sleep_forever()

    trio.run(main)
    """
)


async def test_a_second_signal_exits_at_once() -> None:
    with trio.fail_after(60):
        done = await trio.run_process(
            [sys.executable, "-c", _SECOND], capture_stderr=True, check=False
        )
    assert done.returncode == ExitCode.for_signal(signal.SIGINT) == 130
    err = done.stderr.decode()
    assert "SIGINT: stopping after the transaction in flight (again to exit at once)" in err
    assert err.endswith("\ntradecanvas import: second signal, exiting at once\n")
