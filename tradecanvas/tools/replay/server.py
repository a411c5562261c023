"""The replay's trio shell: the timeline task, the WebSocket streams and a Starlette app for
REST.

:class:`ReplayServer` owns the exchange clock (``now_ms``), the connected WebSocket clients
and the REST answers; :func:`serve_replay` serves the streams on their own listener
(:mod:`~tradecanvas.tools.replay.ws`) and REST on Hypercorn through
:func:`~tradecanvas.serve.http_server.serve_http` (a bounded drain on cancellation: the
replay exits even when a REST client stopped reading), and reports a :class:`ReplayHandle`
once both listen. What to send, when, and what to answer comes from
the pure core, :mod:`~tradecanvas.tools.replay.core`.

Channel contract: each WebSocket client has its own bounded channel of
:data:`~tradecanvas.tools.replay.ws.CLIENT_BUFFER` framed messages; the timeline frames each
message once for all clients and awaits the slowest client only when its channel is full
(``--speed max`` runs as fast as clients read), and a ``None`` in a client's channel closes
that connection with :data:`~tradecanvas.tools.replay.ws.DROP_CLOSE_CODE` after the frames
queued before it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import itertools
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Final, final

import attrs
import orjson
import trio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tradecanvas.errors import SeriesIdError
from tradecanvas.model import BINANCE_INTERVALS, MINUTE, MS, Market, Timeframe
from tradecanvas.serve.http_server import serve_http
from tradecanvas.tools.replay.core import (
    FaultPlan,
    ReplayFrame,
    Schedule,
    closed_bars,
    interval_bars,
    phase_3d,
    timeline_frames,
)
from tradecanvas.tools.replay.data import (
    ONE_MINUTE,
    ReplayConfig,
    ReplayData,
    ReplayError,
    load_data,
)
from tradecanvas.tools.replay.ws import WsClient, open_client, serve_replay_ws, ws_text_frame
from tradecanvas.upstream.rest import DEFAULT_WEIGHT_LIMIT, KLINES_LIMIT, klines_weight
from tradecanvas.wire.binance_rest import candle_to_rest_row

REST_DEFAULT_LIMIT: Final = 500
# frames the timeline hands to clients' channels between two checkpoints (it awaits only a
# full channel; this keeps REST and signals answered while every client keeps up)
YIELD_EVERY: Final = 64
# frames the timeline builds and frames ahead while ``--paused`` (about 0.8 KiB each): the
# JSON and framing of each is then done before the replay is resumed, not while it sends
PREPARE_MAX: Final = 50_000
# frames prepared between two checkpoints (a few ms: signals and REST stay answered)
PREPARE_CHUNK: Final = 256
# REST's graceful drain when the replay is cancelled; connections still open after it are
# aborted (serve_http)
DRAIN_S: Final = 1.0


@attrs.frozen
class ReplayStatistics:
    """What the replay has done so far; ``now_ms`` is its exchange clock."""

    bars: int
    frames_sent: int
    closes_omitted: int
    closes_duplicated: int
    drops: int
    ws_connections: int
    clients: int
    rest_requests: int
    rest_429: int
    now_ms: int
    finished: bool


@final
class ReplayServer:
    """Owns the replay's exchange clock, its WebSocket clients and its REST answers.

    The clock (``now_ms``) is the event time of the last frame sent; REST serves the bars
    closed by it. :meth:`run_timeline` sends the frames to the clients :meth:`attach`
    registered; the Starlette :meth:`app` routes to the REST handlers."""

    def __init__(self, config: ReplayConfig, data: ReplayData) -> None:
        self.config = config
        self.data = data
        self.finished = trio.Event()
        self.resumed = trio.Event()
        if not config.paused:
            self.resumed.set()
        self._clients: set[WsClient] = set()
        self._client_arrived = trio.Event()
        self._last_closed: dict[str, ReplayFrame] = {}
        start = min(config.start_at, len(data.minutes))
        self.now_ms = data.minutes[start] * MS if start < len(data.minutes) else 0
        self._frames_sent = 0
        self._omitted = 0
        self._duplicated = 0
        self._drops = 0
        self._ws_connections = 0
        self._rest_requests = 0
        self._rest_429 = 0
        self._unyielded = 0
        self._answered_429 = False
        self._rest_faults = list(config.rest_faults)
        self._weight_window = -1
        self._weight_used = 0

    def statistics(self) -> ReplayStatistics:
        return ReplayStatistics(
            bars=len(self.data.minutes),
            frames_sent=self._frames_sent,
            closes_omitted=self._omitted,
            closes_duplicated=self._duplicated,
            drops=self._drops,
            ws_connections=self._ws_connections,
            clients=len(self._clients),
            rest_requests=self._rest_requests,
            rest_429=self._rest_429,
            now_ms=self.now_ms,
            finished=self.finished.is_set(),
        )

    # --- the timeline --------------------------------------------------------------------

    async def run_timeline(self) -> None:
        """Send every frame once resumed, waiting while no client is connected and, at a
        ``speed``, until each frame's time on a schedule: its exchange-time distance from
        the first frame ÷ ``speed`` (the time spent sending does not add up over the run;
        a replay held back by a slow client catches up). Waiting for a client and a
        ``--stall`` move the schedule on; after a drop it starts again from the next frame.
        ``finished`` at the end."""
        config = self.config
        plan = FaultPlan.of(config, self.data.minutes)
        schedule = None if config.speed is None else Schedule(config.speed)
        stalls = sorted(config.stall_at)
        delays = dict(config.delay_closes)
        held: list[tuple[int, ReplayFrame]] = []  # delayed closes: (send after bar, frame)
        frames = timeline_frames(config, self.data)
        prepared = await self._prepare_while_paused(frames)
        await self.resumed.wait()
        timeline = itertools.chain(_drain(prepared), ((f, None) for f in frames))
        for frame, framed in timeline:
            if held and frame.kind == "closed" and held[0][0] < frame.minute:
                due = [f for after, f in held if after < frame.minute]
                held = [(after, f) for after, f in held if after >= frame.minute]
                for late in due:
                    await self._broadcast(late)
            if stalls and frame.kind == "closed" and frame.minute >= stalls[0]:
                stalls.pop(0)
                await _pausing(schedule, functools.partial(trio.sleep, config.stall_s))
            step = plan.step(frame)
            if step.drop:
                await self._drop_clients()
                self._drops += 1
                if step.clock_ms is not None:
                    self.now_ms = max(self.now_ms, step.clock_ms)
                if schedule is not None:
                    schedule.restart()
            if step.omitted:
                self._omitted += 1
            if not step.sends:
                continue
            if not self._clients:
                await _pausing(schedule, self._wait_for_a_client)
            if schedule is not None:
                send_at = schedule.send_at(frame.event_ms, trio.current_time())
                if send_at > trio.current_time():
                    await trio.sleep_until(send_at)
            self.now_ms = max(self.now_ms, frame.event_ms)
            if frame.kind == "closed" and frame.minute in delays:
                held.append((frame.minute + delays[frame.minute], frame))
                held.sort(key=lambda item: item[0])
                continue
            await self._broadcast(frame, framed)
            if step.sends > 1:
                self._duplicated += 1
                await self._broadcast(frame, framed)
        for _, late in held:
            await self._broadcast(late)
        self.now_ms = max(
            self.now_ms, (self.data.minutes[-1] + MINUTE) * MS if self.data.minutes else 0
        )
        self.finished.set()

    async def _wait_for_a_client(self) -> None:
        while not self._clients:
            await self._client_arrived.wait()
            self._client_arrived = trio.Event()

    async def _prepare_while_paused(
        self, frames: Iterator[ReplayFrame]
    ) -> collections.deque[tuple[ReplayFrame, bytes]]:
        """Until resumed, the first frames of the timeline (at most :data:`PREPARE_MAX`)
        and each one's combined-stream WebSocket frame: what the timeline then sends first,
        without building them on the way. The timeline itself (faults, the clock, pacing)
        is unchanged; not ``--paused``, nothing is prepared."""
        prepared: collections.deque[tuple[ReplayFrame, bytes]] = collections.deque()
        while not self.resumed.is_set() and len(prepared) < PREPARE_MAX:
            size = min(PREPARE_CHUNK, PREPARE_MAX - len(prepared))
            chunk = [(f, ws_text_frame(f.text)) for f in itertools.islice(frames, size)]
            prepared.extend(chunk)
            if len(chunk) < size:
                break  # the whole timeline is prepared
            await trio.lowlevel.checkpoint()
        return prepared

    async def _broadcast(self, frame: ReplayFrame, framed: bytes | None = None) -> None:
        """Send ``frame`` to its clients (``framed``: its combined-stream frame, if
        prepared)."""
        self._frames_sent += 1
        if frame.kind == "closed":
            self._last_closed[frame.stream] = frame
        combined = framed
        raw: bytes | None = None
        for client in list(self._clients):
            if frame.stream not in client.streams and (frame.stream or frame.kind != "other"):
                continue  # a frame without a stream (serverShutdown, …) goes to everyone
            if client.raw:
                data = raw = raw or ws_text_frame(frame.raw_text())
            else:
                data = combined = combined or ws_text_frame(frame.text)
            try:
                try:
                    client.send.send_nowait(data)
                except trio.WouldBlock:
                    await client.send.send(data)  # the slowest client sets the pace
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                self._clients.discard(client)
        self._unyielded += 1
        if self._unyielded >= YIELD_EVERY:
            self._unyielded = 0
            await trio.lowlevel.checkpoint()

    async def _drop_clients(self) -> None:
        for client in list(self._clients):
            self._clients.discard(client)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await client.send.send(None)  # after the frames already queued
        self._client_arrived = trio.Event()

    # --- WebSocket -----------------------------------------------------------------------

    def attach(self, streams: set[str], raw: bool) -> WsClient:
        """A WebSocket client whose handshake is done: combined (``/stream?streams=…``) or
        raw (``/ws/<stream>``, ``/ws``)."""
        client = open_client(streams, raw)
        if self.finished.is_set():
            # the data is over: a late joiner gets each stream's last close, so that it
            # learns where the exchange is (and backfills what it missed from REST)
            for stream in sorted(streams):
                last = self._last_closed.get(stream)
                if last is not None:
                    client.send.send_nowait(ws_text_frame(last.raw_text() if raw else last.text))
        self._ws_connections += 1
        self._clients.add(client)
        self._client_arrived.set()
        return client

    def detach(self, client: WsClient) -> None:
        self._clients.discard(client)

    # --- REST ----------------------------------------------------------------------------

    def _weigh(self, weight: int) -> int:
        window = int(trio.current_time() // MINUTE)
        if window != self._weight_window:
            self._weight_window, self._weight_used = window, 0
        self._weight_used += weight
        return self._weight_used

    def _json(self, doc: object, status: int = 200, weight: int = 1) -> Response:
        return Response(
            orjson.dumps(doc),
            status_code=status,
            media_type="application/json",
            headers={"X-MBX-USED-WEIGHT-1M": str(self._weigh(weight))},
        )

    def _error(self, code: int, msg: str, status: int = 400) -> Response:
        return self._json({"code": code, "msg": msg}, status)

    async def klines(self, request: Request) -> Response:
        market: Market = "futures" if request.url.path.startswith("/fapi") else "spot"
        self._rest_requests += 1
        if self._rest_faults:
            status = self._rest_faults.pop(0)
            if status == 0:  # a request that times out
                await trio.sleep(self.config.rest_hang_s)
                status = 504
            self._rest_429 += status == 429
            response = self._error(-1003, f"Replay's REST fault {status}.", status)
            response.headers["Retry-After"] = str(self.config.retry_after_s)
            return response
        if self.config.rest_429_first and not self._answered_429:
            self._answered_429 = True
            self._rest_429 += 1
            response = self._error(-1003, "Too many requests; please use the websocket.", 429)
            response.headers["Retry-After"] = str(self.config.retry_after_s)
            return response
        q = request.query_params
        symbol = q.get("symbol", "")
        try:
            timeframe = Timeframe.parse(q.get("interval", ""))
        except SeriesIdError:
            return self._error(-1120, "Invalid interval.")
        if timeframe.text not in BINANCE_INTERVALS:
            return self._error(-1120, "Invalid interval.")
        bars = self.data.bars.get((market, symbol))
        if bars is None:
            return self._error(-1121, "Invalid symbol.")
        try:
            limit = int(q.get("limit", REST_DEFAULT_LIMIT))
            start = int(q["startTime"]) if "startTime" in q else None
            end = int(q["endTime"]) if "endTime" in q else None
        except ValueError:
            return self._error(-1100, "Illegal characters found in a parameter.")
        if not 1 <= limit <= KLINES_LIMIT[market]:
            return self._error(-1130, "Data sent for parameter 'limit' is not valid.")
        if timeframe == ONE_MINUTE:
            rows = closed_bars(bars, self.now_ms, start, end, limit)
        else:
            phase = phase_3d(self.config, market, symbol) if timeframe.phased else 0
            rows = interval_bars(bars, timeframe, phase, self.now_ms, start, end, limit)
        return self._json(
            [candle_to_rest_row(c, timeframe) for c in rows], weight=klines_weight(market, limit)
        )

    async def server_time(self, request: Request) -> Response:
        return self._json({"serverTime": self.now_ms})

    async def exchange_info(self, request: Request) -> Response:
        market: Market = "futures" if request.url.path.startswith("/fapi") else "spot"
        symbols = sorted(s for m, s in self.data.bars if m == market)
        return self._json(
            {
                "timezone": "UTC",
                "serverTime": self.now_ms,
                "rateLimits": [
                    {
                        "rateLimitType": "REQUEST_WEIGHT",
                        "interval": "MINUTE",
                        "intervalNum": 1,
                        "limit": self.config.weight_limit or DEFAULT_WEIGHT_LIMIT[market],
                    }
                ],
                "symbols": [{"symbol": s, "status": "TRADING"} for s in symbols],
            }
        )

    def app(self) -> Starlette:
        routes: list[Route] = []
        for prefix in ("/fapi/v1", "/api/v3"):
            routes.append(Route(f"{prefix}/klines", self.klines))
            routes.append(Route(f"{prefix}/time", self.server_time))
            routes.append(Route(f"{prefix}/exchangeInfo", self.exchange_info))
        return Starlette(routes=routes)


async def _pausing(schedule: Schedule | None, pause: Callable[[], Awaitable[None]]) -> None:
    """Await ``pause()``; the timeline's schedule (if any) moved on by the time it took."""
    started = trio.current_time()
    await pause()
    if schedule is not None:
        schedule.pause(trio.current_time() - started)


def _drain(
    items: collections.deque[tuple[ReplayFrame, bytes]],
) -> Iterable[tuple[ReplayFrame, bytes]]:
    """``items`` from the first, each let go of as it is taken."""
    while items:
        yield items.popleft()


@attrs.frozen
class ReplayHandle:
    """What :func:`serve_replay` reports once it listens."""

    ws_url: str
    rest_url: str
    server: ReplayServer

    @property
    def finished(self) -> trio.Event:
        return self.server.finished

    def statistics(self) -> ReplayStatistics:
        return self.server.statistics()

    def resume(self) -> bool:
        """Start a ``paused`` timeline; False if it was running already."""
        if self.server.resumed.is_set():
            return False
        self.server.resumed.set()
        return True


async def serve_replay(
    config: ReplayConfig, *, task_status: trio.TaskStatus[ReplayHandle] = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve ``config`` until cancelled; ``started(ReplayHandle)`` once listening.
    Raises ReplayError (before ``started``) for unusable files."""
    data = await trio.to_thread.run_sync(load_data, config)
    await serve_replay_data(config, data, task_status=task_status)


async def serve_replay_data(
    config: ReplayConfig,
    data: ReplayData,
    *,
    task_status: trio.TaskStatus[ReplayHandle] = trio.TASK_STATUS_IGNORED,
) -> None:
    """:func:`serve_replay` with the files read already (the CLI reads them before it
    listens, to report bad files first). Raises ReplayError when they hold no klines."""
    if not data.minutes:
        raise ReplayError("the replay files hold no klines")
    ws_port, rest_port = listen_ports(config)
    server = ReplayServer(config, data)
    host = config.host
    async with trio.open_nursery() as nursery:
        ws = await nursery.start(serve_replay_ws, host, ws_port, server.attach, server.detach)
        # serve_http, not hypercorn.trio.serve: Hypercorn writes in a shielded scope, so a
        # REST client that stops reading would hold the replay's exit forever; serve_http
        # aborts the connections still open at the end of its bounded drain
        rest = await nursery.start(
            functools.partial(serve_http, server.app(), host=host, port=rest_port, drain_s=DRAIN_S)
        )
        nursery.start_soon(server.run_timeline)
        task_status.started(ReplayHandle(f"ws://{host}:{ws}", f"http://{host}:{rest}", server))


def listen_ports(config: ReplayConfig) -> tuple[int, int]:
    """The WebSocket and REST ports (0: any free): ``--ws-port``, else ``--port``; and
    ``--rest-port``, else the one above ``--port`` (any free when ``--port`` is 0). They
    have their own listeners, so they differ; ReplayError when they would not."""
    ws_port = config.ws_port if config.ws_port is not None else config.port
    rest_port = config.rest_port
    if rest_port is None:
        rest_port = config.port + 1 if config.port else 0
    if ws_port and ws_port == rest_port:
        raise ReplayError(
            f"the WebSocket and REST ports must differ (both {ws_port}): the streams have"
            " their own listener"
        )
    return ws_port, rest_port
