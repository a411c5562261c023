"""Issue 17 item 7: SIGTERM to ``tradecanvas serve`` under load — many subscribers and the
replay streaming 4 symbols at a bar a second each (a commit about every second) — run after
run on one store.

What "received before the signal" means, measured from outside: a ``candle_forming`` for bar
t of a series reaches a subscriber only after the daemon read bar t-1's close from the same
upstream connection (the replay sends a bar's close before the next bar's forming frames),
so every bar below the newest forming bar any subscriber saw before the signal was received.
Each of those must be in the store after the exit, equal to the source; the exit is 0 within
10 s; every subscriber is closed with 1001; what subscribers were sent is stored.

Sizes: ``make test`` 100 subscribers × 3 runs; ``make soak`` 1,000 × 20.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio_websocket

from tests.cli_rig import children, exit_code_within
from tests.reliability.record import ReliabilityRecord, report, sized
from tests.reliability.rig import (
    START,
    WAIT_S,
    connect,
    csv_files,
    market_files,
    serve_env,
    start_replay,
    start_serve,
    stored_differences,
    stored_rows,
)
from tradecanvas.errors import find_in_group

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 1707
BARS_PER_RUN = 60  # the replay's data lasts the runs at a bar per second
# a bar a second per series: a thousand Python clients in one test process read ~2,000
# messages a second (faster, they fall behind and the daemon drops them as slow consumers)
SPEED = "60"


class Progress:
    """Set on every forming candle any client gets: the test waits on it, never sleeps."""

    def __init__(self) -> None:
        self.event = trio.Event()

    def tick(self) -> None:
        self.event.set()
        self.event = trio.Event()


class LoadClient:
    """One subscriber of one series: the newest forming bar and the closed candles it got."""

    def __init__(self, series: str, since: int, progress: Progress) -> None:
        self.series = series
        self.progress = progress
        self.since = since
        self.forming = -1
        self.closed: list[int] = []
        self.close_code: int | None = None
        self.subscribed = trio.Event()
        self.done = trio.Event()

    async def run(self, url: str) -> None:
        try:
            async with connect(url) as ws:
                sub = {"type": "subscribe", "series_id": self.series, "since": self.since}
                await ws.send_message(orjson.dumps(sub | {"supports_batch": True}).decode())
                await ws.send_message('{"type": "ping"}')
                while True:
                    m: dict[str, Any] = orjson.loads(await ws.get_message())
                    if m["type"] == "pong":
                        self.subscribed.set()
                    elif m["type"] == "candle_forming":
                        self.forming = max(self.forming, m["candle"]["candle_time"])
                        self.progress.tick()
                    elif m["type"] == "candles_batch":
                        self.closed += [c["candle_time"] for c in m["candles"]]
        except* trio_websocket.ConnectionClosed as group:
            closed = find_in_group(group, trio_websocket.ConnectionClosed)
            self.close_code = closed.reason.code if closed and closed.reason else None
        except* (trio_websocket.HandshakeError, OSError):
            self.close_code = -1
        finally:
            self.subscribed.set()
            self.done.set()


async def test_sigterm_under_load_loses_nothing_and_closes_with_1001(tmp_path: Path) -> None:
    clients_per_run = sized(100, 1000)
    runs = sized(3, 20)
    source = market_files(tmp_path, SEED, BARS_PER_RUN * runs + 100)
    series = sorted(source)
    db = tmp_path / "market.sqlite3"
    log = tmp_path / "serve.log"
    owed: dict[str, int] = {s: START for s in series}  # bars below this were received
    delivered = dup = 0
    exits: list[int] = []
    codes: list[int | None] = []
    with children() as kids:
        _, ws, rest = await start_replay(kids, tmp_path, csv_files(tmp_path), "--speed", SPEED)
        env = serve_env(db, ws, rest, series)
        for _ in range(runs):
            proc, url, _http = await start_serve(kids, log, env)
            heads = {s: (r[-1][0] if (r := stored_rows(db, s)) else START - 60) for s in series}
            progress = Progress()
            clients = [
                LoadClient(series[i % len(series)], heads[series[i % len(series)]], progress)
                for i in range(clients_per_run)
            ]
            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(client.run, url)
                with trio.fail_after(WAIT_S):
                    for client in clients:
                        await client.subscribed.wait()
                    # load flows: some forming bars past the head on every series
                    while not all(
                        max(c.forming for c in clients if c.series == s) > heads[s] + 120
                        for s in series
                    ):
                        await progress.event.wait()
                proc.send_signal(signal.SIGTERM)
                seen = {s: max(c.forming for c in clients if c.series == s) for s in series}
                exits.append(await exit_code_within(proc, within=10))
                with trio.fail_after(WAIT_S):
                    for client in clients:
                        await client.done.wait()
            codes += [c.close_code for c in clients]
            for sid in series:
                owed[sid] = max(owed[sid], seen[sid])
                # every bar below the newest forming one seen is stored, equal to the source
                want = [c for c in source[sid] if c.candle_time < owed[sid]]
                n, missing, different = stored_differences(db, sid, want)
                assert (missing, different) == (0, 0), (sid, owed[sid], n)
            stored_times = {s: {r[0] for r in stored_rows(db, s)} for s in series}
            for client in clients:
                delivered += len(client.closed)
                dup += len(client.closed) - len(set(client.closed))
                assert set(client.closed) <= stored_times[client.series]
                assert client.closed == sorted(client.closed)

    attempted = sum(len([c for c in source[s] if c.candle_time < owed[s]]) for s in series)
    lost = sum(stored_differences(db, s, source[s][: (owed[s] - START) // 60])[1] for s in series)
    assert exits == [0] * runs
    assert codes == [1001] * (runs * clients_per_run), sorted(set(map(str, codes)))
    report(
        ReliabilityRecord(
            test="graceful_stop",
            seed=SEED,
            faults=runs,
            attempted=attempted,
            stored=sum(len(stored_rows(db, s)) for s in series),
            delivered=delivered,
            lost=lost,
            duplicated=dup,
        )
    )
    assert (lost, dup) == (0, 0)
