"""Running the real ``tradecanvas`` CLI in subprocesses: environments, logs, waiting for a
line. Children write to files, never to pipes, so they can never block on a full pipe."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import trio


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update({"TRADE_CANVAS_WS_PORT": "0", "TRADE_CANVAS_HTTP_PORT": "0"})
    env.update(extra)
    return env


@contextmanager
def run_cli(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tradecanvas", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


async def wait_for_line(log: Path, pattern: str, proc: subprocess.Popen[bytes]) -> re.Match[str]:
    """Wait for a line in a child's log (a file: the child must never block on a pipe)."""
    with trio.fail_after(60):
        while (match := re.search(pattern, await trio.Path(log).read_text())) is None:
            assert proc.poll() is None, await trio.Path(log).read_text()
            await trio.sleep(0.02)
    return match


async def exit_code_within(proc: subprocess.Popen[bytes], within: float) -> int:
    with trio.fail_after(within):
        return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
