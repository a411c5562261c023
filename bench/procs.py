"""Child processes of a benchmark: the real ``tradecanvas replay`` and ``serve``, the
baseline relays and the subscriber clients, each its own process writing to a log file
(never a pipe it could block on). Waiting for them polls their logs: this is a benchmark
driver, not a test, and the polls are outside every timed interval."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final

import httpx
import trio

from bench.common import ROOT

START_TIMEOUT_S: Final = 60.0
POLL_S: Final = 0.02


class Child:
    """One child process and its log file."""

    def __init__(self, name: str, args: Sequence[str], log: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                list(args),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.PIPE,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    async def wait_line(self, pattern: str, timeout: float = START_TIMEOUT_S) -> re.Match[str]:
        with trio.fail_after(timeout):
            while (match := re.search(pattern, self.text())) is None:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.text()}")
                await trio.sleep(POLL_S)
        return match

    async def wait_exit(self, timeout: float) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(POLL_S)
        return self.proc.returncode

    def say(self, line: str) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(line.encode() + b"\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    async def stop(self, grace: float = 10.0) -> None:
        """SIGTERM, then SIGKILL of its process group if it lingers."""
        self.signal(signal.SIGTERM)
        with trio.move_on_after(grace):
            while self.proc.poll() is None:
                await trio.sleep(POLL_S)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        if self.proc.stdin is not None:
            self.proc.stdin.close()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
    env.pop("NOTIFY_SOCKET", None)
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


@asynccontextmanager
async def children() -> AsyncIterator[list[Child]]:
    """A list to put children in; all are stopped at the end, last started first."""
    started: list[Child] = []
    try:
        yield started
    finally:
        with trio.CancelScope(shield=True):
            for child in reversed(started):
                await child.stop()


async def start_replay(
    kids: list[Child],
    work: Path,
    files: Sequence[str],
    *,
    speed: str,
    forming_per_bar: int,
) -> tuple[Child, str, str]:
    """``tradecanvas replay --paused``; (child, ws url, rest url)."""
    args = [sys.executable, "-m", "tradecanvas", "replay", *files, "--paused",
            "--speed", speed, "--forming-per-bar", str(forming_per_bar)]  # fmt: skip
    child = Child("replay", args, work / "replay.log", child_env())
    kids.append(child)
    match = await child.wait_line(r"replay ws=(\S+) rest=(\S+)")
    return child, match.group(1), match.group(2)


async def resume_replay(replay: Child) -> None:
    replay.signal(signal.SIGUSR1)
    await replay.wait_line(r"replay resumed")


async def start_serve(
    kids: list[Child],
    work: Path,
    series: Sequence[str],
    replay_ws: str,
    replay_rest: str,
    **flags: str,
) -> tuple[Child, str, str]:
    """``tradecanvas serve`` against the replay, every flag at its default unless given;
    returns once ``/readyz`` says ready (upstream connected). (child, ws url, http url)."""
    env = child_env(
        TRADE_CANVAS_DB_PATH=str(work / "market.sqlite3"),
        TRADE_CANVAS_SERIES=",".join(series),
        TRADE_CANVAS_WS_PORT="0",
        TRADE_CANVAS_HTTP_PORT="0",
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL=replay_ws,
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL=replay_rest,
        TRADE_CANVAS_INITIAL_BACKFILL_CANDLES="0",
        TRADE_CANVAS_LOG_LEVEL="INFO",
        **{f"TRADE_CANVAS_{k.upper()}": v for k, v in flags.items()},
    )
    child = Child("serve", [sys.executable, "-m", "tradecanvas", "serve"], work / "serve.log", env)
    kids.append(child)
    match = await child.wait_line(r"tradecanvas ready ws=(\S+) http=(\S+)")
    ws_url, http_url = match.group(1), match.group(2)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(START_TIMEOUT_S):
            while (await client.get(f"{http_url}/readyz")).status_code != 200:
                await trio.sleep(POLL_S)
    return child, ws_url, http_url


async def start_relay(
    kids: list[Child], work: Path, kind: str, replay_ws: str, streams_file: Path
) -> tuple[Child, str]:
    """A baseline relay (``bench.relays``) connected to the replay; (child, ws url)."""
    args = [sys.executable, "-m", "bench.relays", kind, replay_ws, str(streams_file)]
    child = Child(f"relay-{kind}", args, work / f"relay-{kind}.log", child_env())
    kids.append(child)
    match = await child.wait_line(r"relay ws=(\S+) upstream connected")
    return child, match.group(1)


async def start_clients(kids: list[Child], work: Path, name: str, plan: Path) -> Child:
    """A subscriber process (``bench.clients``); returns once every client is subscribed."""
    out = work / f"{name}.json"
    args = [sys.executable, "-m", "bench.clients", str(plan), str(out)]
    child = Child(name, args, work / f"{name}.log", child_env())
    kids.append(child)
    await child.wait_line(r"clients ready")
    return child


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")
