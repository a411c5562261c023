"""What both topologies of the acceptance replay share (scripts/e2e_acceptance.sh): the
report, a run per kill-switch value with its replay of the real week, and the comparisons
against the Binance data. The child processes (each in its own process group, killed on the
way out) are the tests' :class:`tests.cli_rig.Children`."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
import traceback
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, TypeVar

import trio

ROOT: Final = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.cli_rig import Children, wait_for_line  # noqa: E402
from tradecanvas.model import Candle  # noqa: E402
from tradecanvas.runtime_flags import binance_data_dir  # noqa: E402
from tradecanvas.wire.kline_csv import read_kline_csv  # noqa: E402

# the installed console script, as the systemd unit and a user start it
PROGRAM: Final = (str(ROOT / ".venv" / "bin" / "tradecanvas"),)
BASE: Final = "binance:futures:BTC/USDT:1m"
FIVE: Final = "binance:futures:BTC/USDT:5m"
TOKEN: Final = "e2e-acceptance-token-0123456789"
DAY_BARS: Final = 1440
# faults: the drop and the omitted/duplicated closes all fall inside the streamed days
DROP_AT: Final = 3000
SKIP: Final = 7
WAIT_ALL_S: Final = 240.0
# a role without a WebSocket port (the ingest) says ws=-
READY: Final = r"tradecanvas ready ws=(\S+) http=(\S+)"
OBJ = dict[str, Any]


def five_floor(t: int) -> int:
    return t - t % 300


def data_dir() -> Path:
    found = binance_data_dir()
    if found is None:
        raise SystemExit("e2e: no Binance data (TRADE_CANVAS_DATA_DIR, ../shared, make test-data)")
    return found


class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        if ok:
            self.passed += 1
        else:
            self.failed += 1
        suffix = f" — {detail}" if detail else ""
        print(f"{'PASS' if ok else 'FAIL'} {name}{suffix}", flush=True)
        return ok


async def stop(proc: subprocess.Popen[bytes]) -> tuple[int | None, float]:
    """SIGTERM; (the exit code, None if still running after 15 s; the seconds it took)."""
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    with trio.move_on_after(15):
        while proc.poll() is None:
            await trio.sleep(0.05)  # waiting for a child to exit
    return proc.poll(), time.monotonic() - start


class Replay:
    """``tradecanvas replay`` of the week, paused after the first day (the REST history)
    until :meth:`resume`; with a dropped connection and skipped bars, omitted and duplicated
    closes in the streamed days."""

    def __init__(self, proc: subprocess.Popen[bytes], log: Path, ws: str, rest: str) -> None:
        self.proc = proc
        self.log = log
        self.ws = ws
        self.rest = rest

    @classmethod
    async def start(cls, procs: Children, csv: Path, log: Path) -> Replay:
        proc = procs.start(
            [
                "replay", str(csv), "--speed", "max", "--paused",
                "--start-at", str(DAY_BARS),
                "--drop-at", str(DROP_AT), "--skip", str(SKIP),
                "--omit-close-every", "97", "--duplicate-close-every", "89",
            ],
            log,
            {**os.environ},
        )  # fmt: skip
        match = await wait_for_line(log, r"replay ws=(\S+) rest=(\S+)", proc)
        return cls(proc, log, match.group(1), match.group(2))

    async def resume(self) -> None:
        """Start streaming the other six days."""
        self.proc.send_signal(signal.SIGUSR1)
        await wait_for_line(self.log, r"replay resumed", self.proc)


class FlagRun(ABC):
    """One run of a topology for one kill-switch value (``flag``, 0 = legacy publish,
    1 = pipeline publish): its checks, its children, its folder and the real week."""

    # the checks' prefix: "[LABEL=flag] name"
    LABEL: str = "publish"

    def __init__(self, report: Report, procs: Children, work: Path, flag: str) -> None:
        self.report = report
        self.procs = procs
        self.work = work
        self.flag = flag
        folder = data_dir() / "klines_1m_5m" / "futures_um"
        self.csv = folder / "BTCUSDT-1m-2025-07-06_2025-07-12.csv"
        self.minutes = read_kline_csv(self.csv)
        self.fives = read_kline_csv(folder / "BTCUSDT-5m-2025-07-06_2025-07-12.csv")

    def check(self, name: str, ok: bool, detail: str = "") -> bool:
        return self.report.check(f"[{self.LABEL}={self.flag}] {name}", ok, detail)

    def env(self, *, ws: str, rest: str) -> dict[str, str]:
        """The environment of a ``serve`` on the replay: no TRADE_CANVAS_* of the caller's,
        any free ports, the kill-switch, a day of history."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
        env.update(
            TRADE_CANVAS_WS_PORT="0",
            TRADE_CANVAS_HTTP_PORT="0",
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=ws,
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=rest,
            TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH=self.flag,
            TRADE_CANVAS_INITIAL_BACKFILL_CANDLES=str(DAY_BARS),
            TRADE_CANVAS_MARKET_WS_CATCHUP_LIMIT="5000",
        )
        return env

    async def start_replay(self) -> Replay:
        return await Replay.start(self.procs, self.csv, self.work / f"replay-{self.flag}.log")

    @abstractmethod
    async def main(self) -> None: ...


R = TypeVar("R", bound=FlagRun)


def run_each_flag(make: Callable[[str], R], procs: Children, work: Path) -> dict[str, R]:
    """``make(flag).main()`` for 0, then 1; a crash is a failed check (with the tails of the
    run's logs), and the next run goes on. Every child is killed after each."""
    runs: dict[str, R] = {}
    for flag in ("0", "1"):
        run = runs[flag] = make(flag)
        try:
            trio.run(run.main)
        except Exception as exc:  # a crash is a failed check, and the run goes on
            run.check("run completed", False, f"{type(exc).__name__}: {exc}")
            traceback.print_exception(exc)  # an ExceptionGroup's message names no cause
            print_tails(work, flag)
        procs.kill_all()
    return runs


def schema(messages: list[OBJ]) -> dict[str, tuple[str, ...]]:
    """Message kind → its sorted keys (and the candle object's keys).

    A system message's kind includes its event: each event has its own data keys, and
    which system event came last differs between runs.
    """
    result: dict[str, tuple[str, ...]] = {}
    for m in messages:
        kind = m["type"] if m["type"] != "system" else f"system:{m.get('event')}"
        keys = sorted(m)
        if m["type"] == "candles_batch" and m["candles"]:
            keys += ["candle:" + k for k in sorted(m["candles"][0])]
        if m["type"] == "candle_closed":
            keys += ["candle:" + k for k in sorted(m["candle"])]
        if m["type"] == "system":
            keys += ["data:" + k for k in sorted(m["data"])]
        result[kind] = tuple(keys)
    return result


CORE_KINDS = ("candles_batch", "candle_closed", "error", "pong", "system:factor.rebuild")


def same_schemas(a: dict[str, tuple[str, ...]], b: dict[str, tuple[str, ...]]) -> bool:
    """Both modes sent every core kind, and every kind both sent has the same keys."""
    if not all(k in a and k in b for k in CORE_KINDS):
        return False
    return all(a[k] == b[k] for k in a.keys() & b.keys())


def schema_report(a: dict[str, tuple[str, ...]], b: dict[str, tuple[str, ...]]) -> str:
    def verdict(kind: str) -> str:
        if kind not in b:
            return "only with publish=0"
        if kind not in a:
            return "only with publish=1"
        return "same" if a[kind] == b[kind] else "DIFFERENT"

    return "; ".join(f"{k}: {verdict(k)}" for k in sorted(a.keys() | b.keys()))


def equal_candle(wire: OBJ | None, ref: Candle) -> bool:
    """A received candle (None: not received) equals the Binance bar."""
    return (
        wire is not None
        and all(
            wire[f] == float(getattr(ref, f)) for f in ("open", "high", "low", "close", "volume")
        )
        and wire["candle_time"] == ref.candle_time
    )


def sqlite_counts(db: Path) -> dict[str, int]:
    conn = sqlite3.connect(db)
    try:
        return dict(conn.execute("SELECT series_id, COUNT(*) FROM candles GROUP BY series_id"))
    finally:
        conn.close()


def metric(text: str, name: str, labels: str = "") -> float:
    pattern = rf"^{re.escape(name)}{re.escape(labels)} ([0-9.e+-]+)$"
    match = re.search(pattern, text, re.M)
    return float(match.group(1)) if match else -1.0


def print_tails(folder: Path, flag: str, lines: int = 15) -> None:
    """The last lines of every child's log of one run (after a crash, to see why)."""
    for log in sorted(folder.glob(f"*-{flag}*.log")):
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        print(f"--- {log.name} (tail)\n{tail}")


@contextlib.contextmanager
def terminated_on_signals(procs: Children) -> Iterator[None]:
    def handler(signum: int, _: object) -> None:
        procs.kill_all()
        raise SystemExit(128 + signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        procs.kill_all()
        for s, h in old.items():
            signal.signal(s, h)
