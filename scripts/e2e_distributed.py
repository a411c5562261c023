"""The distributed topology of the acceptance replay (``scripts/e2e_acceptance.sh --topology
distributed``; DESIGN §10, docs/distributed.md).

Per kill-switch value (0 = legacy publish, 1 = pipeline publish), on a PostgreSQL database
of its own (a unique name, dropped afterwards) and a Redis key prefix of its own (deleted
afterwards):

1. ``tradecanvas replay`` serves the real USDⓈ-M BTCUSDT 1m week exactly as in the single
   topology: the first day as REST history, the other six streamed, with a dropped connection
   and skipped bars, omitted and duplicated closes.
2. ``serve --role ingest`` ingests it into PostgreSQL and publishes to Redis Streams; two
   ``serve --role edge`` (A and B) serve subscribers from the streams and the store. On A: a
   batch 1m subscriber following the event log and a per-candle 5m one (HTTP port's
   /ws/market); on B the same two, which follow the edges: when B goes away they reconnect
   to A with ``since`` (and ``events_after``) from what they received.
3. During the run the ingest is killed with SIGKILL and started again (as systemd's
   ``Restart=`` would), then edge B is killed with SIGKILL.
4. Checked: every 1m and 5m candle reached every subscriber exactly once, in order, equal to
   Binance's bars; no ``gap``; the event log reached the 1m subscribers exactly once, in
   order; PostgreSQL holds every bar once; the kill-switch; /readyz; SIGTERM.

Needs PostgreSQL (``TEST_POSTGRES_URL``, default ``postgresql://postgres@127.0.0.1:5432/
postgres``, a role that may create databases) and Redis (``TEST_REDIS_URL``, default
``redis://127.0.0.1:6379/0``). When either does not answer, the run is skipped with the
reason (exit 0), except with ``CI=true``, where that is a failure (exit 1).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Final

import httpx
import orjson
import psycopg
import trio
import trio_websocket
from e2e_common import (
    BASE,
    DAY_BARS,
    FIVE,
    OBJ,
    PROGRAM,
    READY,
    WAIT_ALL_S,
    FlagRun,
    Replay,
    Report,
    equal_candle,
    metric,
    run_each_flag,
    stop,
    terminated_on_signals,
)
from e2e_services import (
    REDIS_URL,
    database_exists,
    delete_bus_keys,
    fresh_database,
    services_missing,
)

from tests.cli_rig import Children, wait_for_line
from tests.recording_subscriber import Subscriber
from tradecanvas.upstream.ws_client import open_websocket_client

# the kills, as fractions of the streamed bars a subscriber of edge A has received: so they
# land mid-run at any pace (the replay streams as fast as the ingest reads, waiting for it
# while it is down)
KILL_INGEST_AT: Final = 0.3
KILL_EDGE_AT: Final = 0.6


class Follower:
    """A /ws/market client of one series that follows the edges: it connects to the first URL
    and, whenever its connection ends, to the next, resuming with ``since`` = the newest
    closed ``candle_time`` it received (and ``events_after`` = the newest ``event_id``), as a
    client behind a load balancer does when its edge goes away."""

    def __init__(
        self, name: str, series: str, urls: list[str], *, since: int, batch: bool, events: bool
    ) -> None:
        self.name = name
        self.series = series
        self.urls = urls
        self.since = since
        self.batch = batch
        self.events = events
        self.messages: list[OBJ] = []
        # kept as they come: the waits look at them after every message
        self.closed: list[int] = []
        self.event_ids: list[int] = []
        self.connections = 0
        self.closes: list[str] = []  # how each connection ended
        self.ended = False
        self.changed = trio.Event()

    def view(self) -> Subscriber:
        """Everything received, over all connections, for e2e_common's helpers."""
        view = Subscriber(self.name)
        view.messages = self.messages
        return view

    def times(self) -> list[int]:
        return self.closed

    def _add(self, message: OBJ) -> None:
        self.messages.append(message)
        if message.get("series_id") != self.series:
            return
        kind = message["type"]
        if kind == "candles_batch":
            self.closed.extend(c["candle_time"] for c in message["candles"])
        elif kind == "candle_closed":
            self.closed.append(message["candle"]["candle_time"])
        elif kind == "system" and "event_id" in message:
            self.event_ids.append(message["event_id"])

    def _subscribe(self) -> str:
        times, ids = self.closed, self.event_ids
        message: OBJ = {
            "type": "subscribe",
            "series_id": self.series,
            "since": times[-1] if times else self.since,
        }
        if self.batch:
            message["supports_batch"] = True
        if self.events:
            message["events_after"] = ids[-1] if ids else 0
        return orjson.dumps(message).decode()

    def _poke(self) -> None:
        self.changed.set()
        self.changed = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        for url in self.urls:
            # the package's client: it owns and always closes its socket, and a close racing
            # the edge's read-proof ping ends cleanly (python-trio/trio-websocket#184)
            async with open_websocket_client(url) as ws:
                self.connections += 1
                try:
                    await ws.send_message(self._subscribe())
                    # messages are handled in order: the pong means the subscription is in
                    await ws.send_message('{"type": "ping"}')
                    while True:
                        message = orjson.loads(await ws.get_message())
                        self._add(message)
                        if message["type"] == "pong" and not started:
                            started = True
                            task_status.started()
                        self._poke()
                except trio_websocket.ConnectionClosed as exc:
                    self.closes.append(str(exc.reason))
            self._poke()
        self.ended = True
        self._poke()

    async def wait_until(self, condition: Callable[[], bool], timeout: float) -> bool:
        with trio.move_on_after(timeout):
            while not condition() and not self.ended:
                await self.changed.wait()
        return condition()


class Node:
    """One ``tradecanvas serve --role …`` process and its URLs."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], ws: str, http: str) -> None:
        self.name = name
        self.proc = proc
        self.ws = ws
        self.http = http
        # /ws/market on the HTTP port (one origin)
        self.http_ws = http.replace("http://", "ws://", 1) + "/ws/market"

    def kill(self) -> None:
        """SIGKILL, as a machine or process lost at once."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    async def stop(self) -> tuple[int | None, float]:
        return await stop(self.proc)


class Run(FlagRun):
    LABEL = "distributed publish"

    def __init__(self, report: Report, procs: Children, work: Path, flag: str) -> None:
        super().__init__(report, procs, work, flag)
        self.prefix = f"tc-e2e-{uuid.uuid4().hex[:16]}"
        self.database = ""
        self.database_url = ""
        self.replay: Replay | None = None

    def role_env(self, role: str) -> dict[str, str]:
        assert self.replay is not None
        env = self.env(ws=self.replay.ws, rest=self.replay.rest)
        env.pop("NOTIFY_SOCKET", None)
        env.update(
            TRADE_CANVAS_ROLE=role,
            TRADE_CANVAS_DATABASE_URL=self.database_url,
            TRADE_CANVAS_REDIS_URL=REDIS_URL,
            TRADE_CANVAS_BUS_PREFIX=self.prefix,
        )
        return env

    async def start_node(self, role: str, name: str) -> Node:
        log = self.work / f"{name}-{self.flag}.log"
        proc = self.procs.start(["serve", "--role", role], log, self.role_env(role))
        match = await wait_for_line(log, READY, proc)
        return Node(name, proc, match.group(1), match.group(2))

    async def main(self) -> None:
        with fresh_database() as (name, url):
            self.database, self.database_url = name, url
            try:
                await self.topology()
            finally:
                self.procs.kill_all()  # nothing may write while the database goes
                left = await delete_bus_keys(self.prefix)
        self.check(
            "clean-up: the run's database is dropped and its bus keys are deleted",
            not database_exists(name) and left == 0,
            f"database {name}, prefix {self.prefix}: {left} keys left",
        )

    async def topology(self) -> None:
        replay = self.replay = await self.start_replay()
        # the ingest first: it migrates the new database
        ingest = await self.start_node("ingest", "ingest")
        edges: dict[str, Node] = {}

        async def start_edge(name: str) -> None:
            edges[name] = await self.start_node("edge", name)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_edge, "edge-a")
            nursery.start_soon(start_edge, "edge-b")
        edge_a, edge_b = edges["edge-a"], edges["edge-b"]
        self.check(
            "1 ingest + 2 edges start on PostgreSQL and Redis and report ready",
            True,
            f"database {self.database}, bus prefix {self.prefix}",
        )
        first = self.minutes[0].candle_time
        subs = {
            "a-1m": Follower("a-1m", BASE, [edge_a.ws], since=first - 60, batch=True, events=True),
            "a-5m": Follower("a-5m", FIVE, [edge_a.http_ws], since=first - 300, batch=False,
                             events=False),
            "b-1m": Follower("b-1m", BASE, [edge_b.ws, edge_a.ws], since=first - 60, batch=True,
                             events=True),
            "b-5m": Follower("b-5m", FIVE, [edge_b.http_ws, edge_a.http_ws], since=first - 300,
                             batch=False, events=False),
        }  # fmt: skip
        async with trio.open_nursery() as nursery:
            for sub in subs.values():
                await nursery.start(sub.run)
            await replay.resume()
            ingest = await self.kill_ingest(ingest, subs["a-1m"])
            await self.kill_edge(edge_b, subs)
            last = self.minutes[-1].candle_time
            for sub in subs.values():
                want = last if sub.series == BASE else self.fives[-1].candle_time
                await sub.wait_until(_has(sub, want), WAIT_ALL_S)
            stored = self.stored_events()
            for key in ("a-1m", "b-1m"):
                sub = subs[key]
                await sub.wait_until(_last_event(sub, stored[-1:]), 10)
            self.check_streams(subs, stored)
            await self.check_nodes(ingest, edge_a)
            nursery.cancel_scope.cancel()
        for node in (ingest, edge_a):
            code, took = await node.stop()
            self.check(f"SIGTERM: {node.name} exits 0", code == 0, f"exit={code} in {took:.1f}s")
        self.check_store()

    async def kill_ingest(self, ingest: Node, watcher: Follower) -> Node:
        streamed = len(self.minutes) - DAY_BARS
        at = DAY_BARS + int(streamed * KILL_INGEST_AT)
        await watcher.wait_until(lambda: len(watcher.times()) >= at, WAIT_ALL_S)
        seen = len(watcher.times())
        ingest.kill()
        restarted = await self.start_node("ingest", "ingest-restart")
        self.check(
            "SIGKILL of the ingest mid-run; started again, it reports ready",
            seen < len(self.minutes),
            f"killed with {seen} of {len(self.minutes)} bars on edge A",
        )
        return restarted

    async def kill_edge(self, edge: Node, subs: dict[str, Follower]) -> None:
        watcher = subs["a-1m"]
        at = DAY_BARS + int((len(self.minutes) - DAY_BARS) * KILL_EDGE_AT)
        await watcher.wait_until(lambda: len(watcher.times()) >= at, WAIT_ALL_S)
        seen = len(subs["b-1m"].times())
        edge.kill()
        moved = [subs[k] for k in ("b-1m", "b-5m")]
        for sub in moved:
            await sub.wait_until(_reconnected(sub), 30)
        self.check(
            "SIGKILL of edge B mid-run; its subscribers reconnect to edge A with since and"
            " events_after",
            seen < len(self.minutes) and all(s.connections == 2 for s in moved),
            f"killed with {seen} of {len(self.minutes)} bars on edge B; connections "
            + ", ".join(f"{s.name}={s.connections}" for s in moved),
        )

    def stored_events(self) -> list[int]:
        with psycopg.connect(self.database_url) as conn:
            rows = conn.execute(
                "SELECT event_id FROM events WHERE series_id = %s ORDER BY event_id", (BASE,)
            ).fetchall()
        return [int(r[0]) for r in rows]

    def check_streams(self, subs: dict[str, Follower], stored: list[int]) -> None:
        for key, sub in subs.items():
            ref = self.minutes if sub.series == BASE else self.fives
            times = sub.times()
            got = sub.view().closed_candles(sub.series)
            bad = [c.candle_time for c in ref if not equal_candle(got.get(c.candle_time), c)]
            holes = f", first missing {bad[0]}, last {bad[-1]}" if bad else ""
            where = "edge A" if key.startswith("a") else "edge B, then edge A"
            self.check(
                f"{key} ({where}): every {'1m' if sub.series == BASE else '5m'} candle exactly"
                " once, in order, equal to Binance's",
                times == [c.candle_time for c in ref] and not bad,
                f"{len(times)} received, {len(ref)} expected,"
                f" {len(times) - len(set(times))} duplicates, {len(bad)} differ{holes};"
                f" connections ended: {sub.closes}",
            )
        kinds = {
            key: [m["type"] for m in sub.messages if m["type"] in ("gap", "error")]
            for key, sub in subs.items()
        }
        self.check(
            "no gap and no error to any subscriber",
            not any(kinds.values()),
            ", ".join(f"{k}: {len(v)}" for k, v in kinds.items()),
        )
        for key in ("a-1m", "b-1m"):
            ids = subs[key].event_ids
            self.check(
                f"{key}: the event log's events exactly once, in order",
                bool(stored) and ids == stored,
                f"{len(ids)} received, {len(stored)} stored",
            )

    async def check_nodes(self, ingest: Node, edge: Node) -> None:
        async with httpx.AsyncClient(timeout=10) as client:
            text = (await client.get(f"{ingest.http}/metrics")).text
            legacy = metric(text, "tradecanvas_publish_total", '{path="legacy"}')
            pipeline = metric(text, "tradecanvas_publish_total", '{path="pipeline"}')
            used, unused = (legacy, pipeline) if self.flag == "0" else (pipeline, legacy)
            self.check(
                f"kill-switch {self.flag}: the restarted ingest publishes on the"
                f" {'legacy' if self.flag == '0' else 'pipeline'} path only",
                used > 0 and unused == 0,
                f"legacy={legacy} pipeline={pipeline}",
            )
            committed = metric(text, "tradecanvas_candles_committed_total")
            self.check(
                "the restarted ingest took over: it committed what came after the kill",
                committed > 0,
                f"{committed:.0f} candles committed,"
                f" {metric(text, 'tradecanvas_backfill_candles_total'):.0f} of them from REST",
            )
            ready_i = (await client.get(f"{ingest.http}/readyz")).json()
            ready_e = (await client.get(f"{edge.http}/readyz")).json()
        self.check(
            "/readyz: the ingest's publisher and edge A's feed are connected",
            ready_i["checks"].get("bus_publisher_connected") is True
            and ready_e["checks"].get("bus_feed_connected") is True,
            f"ingest {ready_i['checks']}, edge A {ready_e['checks']}",
        )

    def check_store(self) -> None:
        with psycopg.connect(self.database_url) as conn:
            counts: dict[str, int] = dict(
                conn.execute(
                    "SELECT series_id, COUNT(DISTINCT candle_time) FROM candles"
                    " WHERE series_id = ANY(%s) GROUP BY series_id",
                    ([BASE, FIVE],),
                ).fetchall()
            )
            rows = conn.execute(
                "SELECT COUNT(*) FROM candles WHERE series_id = ANY(%s)", ([BASE, FIVE],)
            ).fetchone()
        total = int(rows[0]) if rows else -1
        self.check(
            "PostgreSQL holds every 1m and 5m bar exactly once",
            counts.get(BASE) == len(self.minutes)
            and counts.get(FIVE) == len(self.fives)
            and total == len(self.minutes) + len(self.fives),
            f"{counts}, {total} rows",
        )


def _has(sub: Follower, t: int) -> Callable[[], bool]:
    return lambda: t in sub.times()


def _last_event(sub: Follower, last: list[int]) -> Callable[[], bool]:
    return lambda: sub.event_ids[-1:] == last


def _reconnected(sub: Follower) -> Callable[[], bool]:
    return lambda: sub.connections >= 2


def main() -> int:
    problem = services_missing()
    if problem is not None:
        if os.environ.get("CI") == "true":
            print(f"FAIL distributed topology: {problem} (CI=true: .ci/run starts the services)")
            return 1
        print(f"SKIP distributed topology: {problem} (with CI=true this is a failure)")
        return 0
    report = Report()
    procs = Children(PROGRAM)
    with terminated_on_signals(procs), tempfile.TemporaryDirectory(prefix="tc-e2e-dist-") as tmp:
        run_each_flag(functools.partial(Run, report, procs, Path(tmp)), procs, Path(tmp))
    print(f"{report.passed} passed, {report.failed} failed")
    return 1 if report.failed else 0
