"""Running the real ``tradecanvas`` CLI in subprocesses: environments, logs, waiting for a
line. Children write to files, never to pipes, so they can never block on a full pipe; each
runs in its own process group, killed on the way out whatever happens.

The acceptance replay (``scripts/e2e_common.py``) runs its children with :class:`Children`
too."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import trio


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
    env.pop("NOTIFY_SOCKET", None)
    env.update({"TRADE_CANVAS_WS_PORT": "0", "TRADE_CANVAS_HTTP_PORT": "0"})
    env.update(extra)
    return env


class Children:
    """Every child in its own process group; :meth:`kill_all` on the way out. ``program``
    is how ``tradecanvas`` is started: ``python -m tradecanvas`` of this interpreter, or
    the installed console script (the e2e scripts: what a user runs)."""

    def __init__(self, program: Sequence[str] = (sys.executable, "-m", "tradecanvas")) -> None:
        self.program = tuple(program)
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        args: list[str],
        log: Path,
        env: dict[str, str],
        preexec_fn: Callable[[], None] | None = None,
        prefix: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """``tradecanvas ARGS`` (after ``prefix``, a wrapper that execs its arguments), its
        output appended to ``log`` (a restart on the same log keeps what came before)."""
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [*(prefix or []), *self.program, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=preexec_fn,
            )
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextmanager
def children() -> Iterator[Children]:
    kids = Children()
    try:
        yield kids
    finally:
        kids.kill_all()


@contextmanager
def run_cli(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``tradecanvas ARGS`` on a fresh ``log``, killed on the way out."""
    log.write_bytes(b"")
    with children() as kids:
        yield kids.start(args, log, env)


async def wait_for_line(
    log: Path, pattern: str, proc: subprocess.Popen[bytes], *, after: int = 0, within: float = 60
) -> re.Match[str]:
    """The first match of ``pattern`` in the child's log (a file: the child must never block
    on a pipe) past byte ``after``; fails when the child exits first or after ``within``
    seconds."""
    with trio.fail_after(within):
        while True:
            text = (await trio.Path(log).read_bytes())[after:].decode(errors="replace")
            if (match := re.search(pattern, text)) is not None:
                return match
            assert proc.poll() is None, f"{log.name} exited {proc.returncode}:\n{text[-3000:]}"
            await trio.sleep(0.02)  # polling a child's log file for a line; not a race


async def exit_code_within(proc: subprocess.Popen[bytes], within: float) -> int:
    with trio.fail_after(within):
        return await trio.to_thread.run_sync(proc.wait, abandon_on_cancel=True)
