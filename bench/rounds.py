"""One round of a process benchmark: a replay, the system under test (``tradecanvas serve``
or a baseline relay), optionally the replay-side observer, and a subscriber process; the
replay starts (SIGUSR1) only once everyone is connected and subscribed.

:class:`Market` writes the synthetic kline CSVs the replay serves: ``symbols`` futures
symbols (AAAUSDT, AABUSDT, …), each with the same ``bars`` 1m bars (the first bars of the
real BTCUSDT week), in the ``open_time,open,high,low,close,volume`` layout — so every
symbol closes each minute at the same exchange time, the minute-boundary burst.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs
import trio

from bench.common import BTC_WEEK, data_file
from bench.micro import synthetic_series
from bench.observer import Observer
from bench.procs import (
    children,
    resume_replay,
    start_clients,
    start_relay,
    start_replay,
    start_serve,
)

ROUND_TIMEOUT_S: Final = 300.0


@attrs.frozen
class Market:
    folder: Path
    series: tuple[str, ...]
    streams: dict[str, str]  # stream name → series id
    bar_times: tuple[int, ...]  # open times, seconds

    @classmethod
    def write(cls, folder: Path, symbols: int, bars: int) -> Market:
        lines = data_file(BTC_WEEK).read_text().splitlines()
        header, rows = lines[0], lines[1 : bars + 1]
        if len(rows) < bars:
            raise ValueError(f"the week holds {len(rows)} bars, not {bars}")
        body = "\n".join([header, *rows]) + "\n"
        series, streams = [], {}
        for sid in synthetic_series(symbols):
            pair = sid.symbol.replace("/", "")
            (folder / f"{pair}-1m-bench.csv").write_text(body)
            series.append(str(sid))
            streams[f"{pair.lower()}@kline_1m"] = str(sid)
        times = tuple(int(r.split(",", 1)[0]) // 1000 for r in rows)
        (folder / "streams.json").write_text(json.dumps(streams))
        return cls(folder, tuple(series), streams, times)

    @property
    def files(self) -> list[str]:
        return sorted(str(p) for p in self.folder.glob("*-1m-bench.csv"))

    def stream_of(self) -> dict[str, str]:
        return {sid: stream for stream, sid in self.streams.items()}


@attrs.frozen
class RoundData:
    resumed_at: float  # time.time() just before SIGUSR1
    closes: dict[tuple[str, int], float]  # observer: (stream, open time) → arrival
    deliveries: list[tuple[float, str, int]]  # (arrival, series id, candle_time)
    errors: list[str]
    error_count: int
    messages: int
    serve_pid: int | None


def spread_subscriptions(series: Sequence[str], clients: int, each: int) -> list[list[str]]:
    """Client i follows series i·each … i·each+each-1 (mod the count): every series about
    equally followed, each client's series distinct."""
    n = len(series)
    return [[series[(i * each + j) % n] for j in range(min(each, n))] for i in range(clients)]


async def run_round(
    system: str,
    market: Market,
    clients: list[list[str]],
    *,
    speed: str,
    forming_per_bar: int = 0,
    observe: Sequence[str] = (),
    profile: Path | None = None,
    serve_flags: dict[str, str] | None = None,
) -> RoundData:
    """Run the whole replay through ``system`` (``daemon``, ``naive`` or ``raw``) to
    ``clients``, until each has the last bar on every series; the observer follows the
    ``observe`` streams (none: no observer)."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{system}-") as d:
        work = Path(d)
        async with children() as kids:
            replay, replay_ws, replay_rest = await start_replay(
                kids, work, market.files, speed=speed, forming_per_bar=forming_per_bar
            )
            serve_pid = None
            if system == "daemon":
                serve, url, _ = await start_serve(
                    kids, work, market.series, replay_ws, replay_rest, **(serve_flags or {})
                )
                serve_pid = serve.pid
            else:
                _, url = await start_relay(
                    kids, work, system, replay_ws, market.folder / "streams.json"
                )
            observer = Observer()
            async with trio.open_nursery() as nursery:
                if observe:
                    await nursery.start(observer.run, replay_ws, list(observe))
                plan = work / "plan.json"
                plan.write_text(
                    json.dumps(
                        {
                            "url": url,
                            "clients": clients,
                            "since": market.bar_times[0] - 60,
                            "last_time": market.bar_times[-1],
                        }
                    )
                )
                subscribers = await start_clients(kids, work, "clients", plan)
                spy = _start_py_spy(serve_pid, profile) if profile and serve_pid else None
                resumed_at = time.time()
                await resume_replay(replay)
                await subscribers.wait_exit(ROUND_TIMEOUT_S)
                if spy is not None:
                    _stop_py_spy(spy)
                nursery.cancel_scope.cancel()
            result = json.loads((work / "clients.json").read_text())
    return RoundData(
        resumed_at,
        observer.closes,
        [(float(t), str(s), int(c)) for t, s, c in result["deliveries"]],
        result["errors"],
        result["error_count"],
        result["messages"],
        serve_pid,
    )


def _start_py_spy(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """py-spy on the daemon: a flamegraph SVG and the raw collapsed stacks."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log").open("wb")
    return subprocess.Popen(
        [
            _py_spy(),
            "record",
            "--pid",
            str(pid),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def _py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else "py-spy"


def _stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
