"""Subscriber fan-out: the Hub behind ``serve_ws_market`` vs. a naive per-message fan-out.

Both sides serve the same ``SUBSCRIBERS`` real trio-websocket clients (in this process, on
127.0.0.1) and get the same candles one publish call per candle, in bursts of ``BURST`` calls
with a checkpoint between bursts (an ingest loop yields between the frames it receives).

- closed: ``Hub.publish_closed(series_id, [candle])`` per candle, each candle committed to a
  real CandleStore first (the Hub heals from it), to batch subscribers (``supports_batch``);
  vs. a plain trio-websocket server whose per-connection task sends every candle as its own
  ``candle_closed`` message. Timed from the first publish until every client has counted
  every candle (in ascending order, each once).
- trickle: the same with a checkpoint after every candle, the least coalescing can do (a
  publish task that keeps up sends only a few candles a message).
- forming: ``FORMING_UPDATES`` updates of one candle, then that candle closed (the end
  marker); the Hub's ``publish_forming`` vs. the naive server sending every update. The
  line's name says how many ``candle_forming`` messages a Hub client got per update published
  (< 1: coalescing keeps only the newest).

Issue 4: sending costs about 19 µs per message per connection with trio-websocket here, so
the number of messages is where the time goes. Each round has a fresh server, store and
clients and times only the publish phase; rounds alternate ours/baseline and the median of
``REPEAT`` is reported (the machine is shared).
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, Protocol, final

import attrs
import trio
import trio_websocket

from bench.common import Result
from tests.conftest import binance_data_dir
from tradecanvas.model import Candle, SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.runtime_flags import DEFAULT_ALLOWED_ORIGINS
from tradecanvas.serve.hub import Hub
from tradecanvas.serve.ws_server import serve_ws_market
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.upstream.ws_client import open_websocket_client
from tradecanvas.wire.json import dumps, loads
from tradecanvas.wire.kline_csv import read_kline_csv

WEEK: Final = "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
SERIES: Final = SeriesId.parse("binance:futures:BTC/USDT:1m")
SID: Final = str(SERIES)
SUBSCRIBERS: Final = 50
# sized so that the whole file runs in ~20 s on 2 cores: the naive rounds dominate
# (about 50 µs a message, sender and receiver both in this process)
CLOSED_CANDLES: Final = 1000
FORMING_UPDATES: Final = 1000
TRICKLE_CANDLES: Final = 500
# publish calls between two checkpoints of the publisher
BURST: Final = 10
REPEAT: Final = 3
# the daemon's defaults (RuntimeFlags subscriber_queue_max, subscriber_send_timeout_s,
# market_ws_catchup_limit)
QUEUE_MAX: Final = 1024
SEND_TIMEOUT_S: Final = 10.0
CATCHUP_LIMIT: Final = 5000
# the naive server's per-connection channel holds a whole round, so that its publishing
# never blocks either (the Hub's never does)
NAIVE_BUFFER: Final = max(CLOSED_CANDLES, FORMING_UPDATES, TRICKLE_CANDLES) + 1
# a safety net against a hung round, not a wait for anything
ROUND_TIMEOUT_S: Final = 60.0


# --- clients ---------------------------------------------------------------------------


@final
class _Tally:
    """The clients of one round: how many are ready, how many have every closed candle."""

    def __init__(self, clients: int) -> None:
        self.clients = clients
        self.ready = 0
        self.done = 0
        self.forming_received = 0
        self.all_ready = trio.Event()
        self.all_done = trio.Event()

    def client_ready(self) -> None:
        self.ready += 1
        if self.ready == self.clients:
            self.all_ready.set()

    def client_done(self, forming: int) -> None:
        self.forming_received += forming
        self.done += 1
        if self.done == self.clients:
            self.all_done.set()


async def _client(url: str, closed_expected: int, tally: _Tally) -> None:
    """Subscribe (batch), wait for the catch-up (ping → pong), then count candles until
    every one of ``closed_expected`` closed candles has arrived; then close."""
    async with open_websocket_client(url) as ws:
        await ws.send_message(
            dumps({"type": "subscribe", "series_id": SID, "since": None, "supports_batch": True})
        )
        await ws.send_message(dumps({"type": "ping"}))
        # the Hub's catch-up (the one seed candle) comes before the pong: not counted
        while loads(await ws.get_message())["type"] != "pong":
            pass
        tally.client_ready()
        closed = forming = 0
        newest = -1
        while closed < closed_expected:
            message = loads(await ws.get_message())
            kind = message["type"]
            if kind == "candles_batch":
                candles = message["candles"]
                closed += len(candles)
                newest = _ascending(newest, candles[0], candles[-1])
            elif kind == "candle_closed":
                closed += 1
                newest = _ascending(newest, message["candle"], message["candle"])
            elif kind == "candle_forming":
                forming += 1
            else:
                raise RuntimeError(f"unexpected message: {message}")
        if closed != closed_expected:
            raise RuntimeError(f"a client got {closed} closed candles, not {closed_expected}")
        tally.client_done(forming)


def _ascending(newest: int, first: dict[str, Any], last: dict[str, Any]) -> int:
    """The newest closed time after a message whose first and last candle are given; raises
    unless they come after ``newest`` (ascending, none twice: with the exact count checked
    at the end, every candle arrived)."""
    first_time, last_time = first["candle_time"], last["candle_time"]
    if not newest < first_time <= last_time:
        raise RuntimeError(f"closed candles out of order: {first_time} after {newest}")
    return int(last_time)


# --- the two fan-outs ------------------------------------------------------------------


class _Sink(Protocol):
    def closed(self, candle: Candle) -> None: ...

    def forming(self, candle: Candle) -> None: ...


@attrs.frozen
class _HubSink:
    hub: Hub

    def closed(self, candle: Candle) -> None:
        self.hub.publish_closed(SID, [candle])

    def forming(self, candle: Candle) -> None:
        self.hub.publish_forming(SID, candle)


@final
class _NaiveSink:
    """Encode each message once and queue it for every connection; each connection's task
    sends it on its own: one ``send_message`` per candle per connection, no coalescing."""

    def __init__(self) -> None:
        self.channels: list[trio.MemorySendChannel[str]] = []

    def closed(self, candle: Candle) -> None:
        self._fan_out({"type": "candle_closed", "series_id": SID, "candle": candle.to_wire()})

    def forming(self, candle: Candle) -> None:
        self._fan_out({"type": "candle_forming", "series_id": SID, "candle": candle.to_wire()})

    def _fan_out(self, message: dict[str, object]) -> None:
        text = dumps(message)
        for channel in self.channels:
            channel.send_nowait(text)

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        await ws.get_message()  # the subscribe
        await ws.get_message()  # the ping
        send, receive = trio.open_memory_channel[str](NAIVE_BUFFER)
        self.channels.append(send)
        await ws.send_message(dumps({"type": "pong"}))
        async with receive:
            async for text in receive:
                await ws.send_message(text)


@asynccontextmanager
async def _hub_server(seed: Candle) -> AsyncIterator[tuple[str, _Sink, CandleStore]]:
    with tempfile.TemporaryDirectory() as d:
        store = await CandleStore.open(Path(d) / "market.sqlite3")
        try:
            await store.upsert(SID, [seed], "ws")
            hub = Hub(
                store,
                series=[SERIES],
                queue_max=QUEUE_MAX,
                send_timeout_s=SEND_TIMEOUT_S,
                catchup_limit=CATCHUP_LIMIT,
                metrics=Metrics(),
            )
            async with trio.open_nursery() as nursery:
                port = await nursery.start(
                    functools.partial(
                        serve_ws_market,
                        hub,
                        host="127.0.0.1",
                        port=0,
                        allowed_origins=DEFAULT_ALLOWED_ORIGINS,
                        max_subscriptions=1,
                    )
                )
                yield f"ws://127.0.0.1:{port}/ws/market", _HubSink(hub), store
                nursery.cancel_scope.cancel()
        finally:
            await store.aclose()


@asynccontextmanager
async def _naive_server() -> AsyncIterator[tuple[str, _Sink]]:
    sink = _NaiveSink()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket,
                sink.handle,
                "127.0.0.1",
                0,
                None,
                disconnect_timeout=2.0,
            )
        )
        yield f"ws://127.0.0.1:{server.port}/ws/market", sink
        nursery.cancel_scope.cancel()


# --- one round -------------------------------------------------------------------------


@attrs.frozen
class _Plan:
    """What the publisher does: ``steps`` of (closed?, candle), a checkpoint every
    ``burst`` publish calls."""

    steps: Sequence[tuple[bool, Candle]]
    burst: int

    @property
    def closed(self) -> list[Candle]:
        return [candle for is_closed, candle in self.steps if is_closed]


@attrs.frozen
class _Round:
    seconds: float
    forming_per_client: float


async def _timed_round(
    url: str, sink: _Sink, plan: _Plan, prepare: Callable[[], Awaitable[object]]
) -> _Round:
    """Connect the clients, run ``prepare`` (commit to the store), then run ``plan`` and
    time it until every client has every closed candle."""
    closed_expected = len(plan.closed)
    tally = _Tally(SUBSCRIBERS)
    async with trio.open_nursery() as clients:
        for _ in range(SUBSCRIBERS):
            clients.start_soon(_client, url, closed_expected, tally)
        await tally.all_ready.wait()
        await prepare()
        start = time.perf_counter()
        for i, (is_closed, candle) in enumerate(plan.steps, 1):
            if is_closed:
                sink.closed(candle)
            else:
                sink.forming(candle)
            if i % plan.burst == 0:
                await trio.lowlevel.checkpoint()
        await tally.all_done.wait()
        seconds = time.perf_counter() - start
    return _Round(seconds, tally.forming_received / SUBSCRIBERS)


async def _ours(seed: Candle, plan: _Plan) -> _Round:
    async with _hub_server(seed) as (url, sink, store):
        return await _timed_round(url, sink, plan, lambda: store.upsert(SID, plan.closed, "ws"))


async def _baseline(plan: _Plan) -> _Round:
    async with _naive_server() as (url, sink):
        return await _timed_round(url, sink, plan, trio.lowlevel.checkpoint)


def _run(round_fn: Callable[[], Awaitable[_Round]]) -> _Round:
    async def go() -> _Round:
        with trio.fail_after(ROUND_TIMEOUT_S):
            return await round_fn()

    return trio.run(go)


@attrs.frozen
class _Comparison:
    ours_s: float
    baseline_s: float
    forming_per_client: float


def _compare(seed: Candle, plan: _Plan) -> _Comparison:
    """``REPEAT`` rounds each, alternating, so a noisy neighbour hits both sides alike."""
    ours: list[_Round] = []
    base: list[_Round] = []
    for _ in range(REPEAT):
        ours.append(_run(functools.partial(_ours, seed, plan)))
        base.append(_run(functools.partial(_baseline, plan)))
    return _Comparison(
        statistics.median(r.seconds for r in ours),
        statistics.median(r.seconds for r in base),
        statistics.median(r.forming_per_client for r in ours),
    )


# --- the benchmarks --------------------------------------------------------------------


def _minutes(count: int) -> list[Candle]:
    return read_kline_csv(binance_data_dir() / WEEK)[:count]


def _closed(count: int, burst: int, what: str) -> Result:
    seed, *closed = _minutes(count + 1)
    result = _compare(seed, _Plan([(True, c) for c in closed], burst))
    return Result(
        f"hub fan-out, {what} ({SUBSCRIBERS} subs × {count} closed, {burst} per checkpoint)",
        result.ours_s,
        result.baseline_s,
        "naive per-message send",
        SUBSCRIBERS * count,
        "candle·sub",
    )


def bench_hub_closed() -> Result:
    """Closed candles in bursts (a reconnect, a backfill, many series at a minute's end)."""
    return _closed(CLOSED_CANDLES, BURST, "bursts")


def bench_hub_trickle() -> Result:
    """The least coalescing can do: the publisher yields after every candle."""
    return _closed(TRICKLE_CANDLES, 1, "trickle")


def bench_hub_forming() -> Result:
    seed, final_candle = _minutes(2)
    prices = (final_candle.open, final_candle.high, final_candle.low, final_candle.close)
    updates = [
        attrs.evolve(final_candle, close=prices[i % len(prices)]) for i in range(FORMING_UPDATES)
    ]
    steps = [(False, c) for c in updates] + [(True, final_candle)]
    result = _compare(seed, _Plan(steps, BURST))
    got = result.forming_per_client
    return Result(
        f"hub forming coalescing ({SUBSCRIBERS} subs × {FORMING_UPDATES} updates, {BURST} per"
        f" checkpoint; a client got {got:.0f} = {got / FORMING_UPDATES:.3f} per update)",
        result.ours_s,
        result.baseline_s,
        "naive per-message send",
        SUBSCRIBERS * FORMING_UPDATES,
        "update·sub",
    )
