"""The connection slot (upstream.binance_ws) over real sockets on 127.0.0.1, against a
scripted trio-websocket server; the autojump clock stands in for the hours that pass.

ScriptedUpstream and real_time_limit are also used by tests/ingest/test_loop.py.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import re
import socket
import threading
from collections.abc import AsyncIterator, Iterator

import attrs
import pytest
import trio
import trio.testing
import trio_websocket

from tests.conftest import candle
from tradecanvas.model import SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.upstream.binance_ws import (
    BURST_MAX,
    UNREACHABLE_AFTER,
    ConnectionCounters,
    FrameBurst,
    run_binance_ws_connections,
)
from tradecanvas.upstream.plan import SILENT_WARN_AFTER, ConnectionPolicy
from tradecanvas.upstream.ws_client import MAX_MESSAGE_BYTES
from tradecanvas.wire.binance import kline_frame
from tradecanvas.wire.json import dumps

CLOSE_NOW = "<close>"  # sent to ScriptedUpstream: close the connection (1001) here
WAIT_S = 60  # real seconds: an autojump clock can jump for ever when something hangs
BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
T0 = 1_751_760_000


class ScriptedUpstream:
    """A Binance WS stand-in whose frames the test sends one by one (CLOSE_NOW closes).

    ``send`` goes to whichever connection reads next; ``sockets[i]`` is connection ``i``
    (to script one of two at once) and ``ended[i]`` is set once it is gone.
    """

    def __init__(self) -> None:
        self.send, self._frames = trio.open_memory_channel[str](100)
        self.connections = 0
        self.connected = trio.Event()
        self.connected_at: list[float] = []  # when each connection was accepted
        self.sockets: list[trio_websocket.WebSocketConnection] = []
        self.ended: list[trio.Event] = []

    async def handler(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        self.connected_at.append(trio.current_time())
        ended = trio.Event()
        self.sockets.append(ws)
        self.ended.append(ended)
        self.connections += 1
        self.connected.set()
        self.connected = trio.Event()
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._forward, ws)
                with contextlib.suppress(trio_websocket.ConnectionClosed):
                    while True:  # until the client goes away
                        await ws.get_message()
                nursery.cancel_scope.cancel()
        finally:
            ended.set()

    async def _forward(self, ws: trio_websocket.WebSocketConnection) -> None:
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            async for text in self._frames:
                if text == CLOSE_NOW:
                    await ws.aclose(code=1001, reason="going away")
                    return
                await ws.send_message(text)

    async def start(self, nursery: trio.Nursery) -> str:
        server: trio_websocket.WebSocketServer = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket, self.handler, "127.0.0.1", 0, ssl_context=None
            )
        )
        return f"ws://127.0.0.1:{server.port}"


@contextlib.contextmanager
def real_time_limit(seconds: float) -> Iterator[None]:
    """Fail a test that runs longer than ``seconds`` of real time, whatever its clock (an
    autojump clock can jump for ever when something hangs)."""
    token = trio.lowlevel.current_trio_token()
    scope = trio.CancelScope()
    timer = threading.Timer(seconds, lambda: token.run_sync_soon(scope.cancel))
    timer.start()
    try:
        with scope:
            yield
    finally:
        timer.cancel()
    if scope.cancelled_caught:
        raise AssertionError(f"the test ran longer than {seconds} s of real time")


@attrs.define
class Slot:
    upstream: ScriptedUpstream
    frames: trio.MemoryReceiveChannel[FrameBurst]
    counters: ConnectionCounters
    metrics: Metrics

    def reconnects(self) -> dict[str, float]:
        """tradecanvas_upstream_reconnects_total by reason, without the zeros."""
        return {
            sample.labels["reason"]: sample.value
            for family in self.metrics.registry.collect()
            for sample in family.samples
            if sample.name == "tradecanvas_upstream_reconnects_total" and sample.value
        }


@contextlib.asynccontextmanager
async def connection_slot(
    policy: ConnectionPolicy, stale_timeout_s: float, capacity: int = 100
) -> AsyncIterator[Slot]:
    upstream = ScriptedUpstream()
    send, receive = trio.open_memory_channel[FrameBurst](capacity)
    slot = Slot(upstream, receive, ConnectionCounters(), Metrics())
    with real_time_limit(WAIT_S):
        async with trio.open_nursery() as nursery:
            url = await upstream.start(nursery)
            nursery.start_soon(
                functools.partial(
                    run_binance_ws_connections,
                    url,
                    send,
                    policy=policy,
                    stale_timeout_s=stale_timeout_s,
                    metrics=slot.metrics,
                    counters=slot.counters,
                    name="test",
                )
            )
            await upstream.connected.wait()
            yield slot
            nursery.cancel_scope.cancel()


def kline(minute: int, *, closed: bool = True) -> str:
    bar = candle(T0 + 60 * minute, "1", "1", "1", "1")
    return dumps(kline_frame(BTC, bar, closed=closed, event_time_ms=(T0 + 60 * minute + 60) * 1000))


SHUTDOWN = dumps({"e": "serverShutdown", "E": T0 * 1000})


async def test_frames_reach_the_channel_tagged_with_their_connection(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection_slot(ConnectionPolicy(), stale_timeout_s=60) as slot:
        await slot.upstream.send.send(kline(0))
        frame = await slot.frames.receive()
        assert frame.generation == 1 and frame.raws == [kline(0)]
        assert slot.counters.connected == 1 and slot.counters.reconnects == 0


@pytest.mark.parametrize("capacity", [1, 100])
async def test_every_frame_arrives_in_order_in_bursts_of_at_most_burst_max(capacity: int) -> None:
    """Frames queued together go in one burst, BURST_MAX at most; a full channel (room
    for one burst) makes the reader wait, and nothing is lost or reordered."""
    sent = [kline(i, closed=False) for i in range(3 * BURST_MAX + 5)]
    async with connection_slot(ConnectionPolicy(), 3600, capacity) as slot:
        for text in sent:
            await slot.upstream.send.send(text)
        got: list[str | bytes] = []
        while len(got) < len(sent):
            burst = await slot.frames.receive()
            assert burst.generation == 1 and 1 <= len(burst.raws) <= BURST_MAX
            got += burst.raws
        assert got == sent


async def test_a_silent_connection_is_replaced_after_stale_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with connection_slot(ConnectionPolicy(), stale_timeout_s=60) as slot:
        first = trio.current_time()
        await slot.upstream.connected.wait()
        assert 60 <= trio.current_time() - first < 62
        assert slot.reconnects() == {"stale": 1} and slot.counters.reconnects == 1
        await slot.upstream.ended[0].wait()
        await slot.upstream.sockets[1].send_message(kline(0))
        assert (await slot.frames.receive()).generation == 2


async def test_server_shutdown_is_noticed_by_the_reader_even_if_nobody_reads_frames(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Binance may close right after serverShutdown: the reader itself has seen it, so
    this is a server_shutdown reconnect without backoff, not a drop — although nothing
    consumes the frames channel here."""
    policy = ConnectionPolicy(reconnect_base_s=30.0, min_connect_interval_s=0.0, healthy_after_s=0)
    async with connection_slot(policy, stale_timeout_s=3600) as slot:
        await slot.upstream.send.send(SHUTDOWN)
        await slot.upstream.send.send(CLOSE_NOW)
        start = trio.current_time()
        await slot.upstream.connected.wait()
        assert trio.current_time() - start < 1  # far below the 30 s of a failing connection
        assert slot.reconnects() == {"server_shutdown": 1}


async def test_server_shutdown_rotates_make_before_break() -> None:
    """Without a close, serverShutdown opens the next connection first; the old one is
    closed only once the new one delivered a frame (``healthy_after_s=0``: the connection
    counts as healthy at once; a young one would back off first, see below)."""
    policy = ConnectionPolicy(min_connect_interval_s=0.0, healthy_after_s=0.0)
    async with connection_slot(policy, stale_timeout_s=3600) as slot:
        await slot.upstream.sockets[0].send_message(SHUTDOWN)
        assert (await slot.frames.receive()).generation == 1
        await slot.upstream.connected.wait()
        assert not slot.upstream.ended[0].is_set()  # both are open now
        await slot.upstream.sockets[0].send_message(kline(0))  # the old one still delivers
        assert (await slot.frames.receive()).generation == 1
        await slot.upstream.sockets[1].send_message(kline(1))
        assert (await slot.frames.receive()).generation == 2
        with trio.fail_after(WAIT_S):
            await slot.upstream.ended[0].wait()
        await trio.testing.wait_all_tasks_blocked()  # the client's side is closed too
        assert slot.reconnects() == {"server_shutdown": 1}
        assert slot.counters.connected == 1


async def test_an_old_connection_is_rotated_before_binances_24_hour_cut(
    autojump_clock: trio.testing.MockClock,
) -> None:
    policy = ConnectionPolicy(rotate_after_s=23.5 * 3600, overlap_max_s=10)
    async with connection_slot(policy, stale_timeout_s=1e9) as slot:
        start = trio.current_time()
        await slot.upstream.connected.wait()
        assert trio.current_time() - start == 23.5 * 3600
        # the new connection sends nothing: the old one is closed after overlap_max_s
        await slot.upstream.ended[0].wait()
        assert trio.current_time() - start >= 23.5 * 3600 + 10
        await trio.testing.wait_all_tasks_blocked()  # the client's side is closed too
        assert slot.reconnects() == {"rotation": 1} and slot.counters.connected == 1


async def test_a_connection_ended_by_an_exception_is_an_error_reconnect(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Not a drop by Binance: here the consumer's end of the frames channel is gone, so the
    reader's send fails."""
    async with connection_slot(ConnectionPolicy(), stale_timeout_s=3600) as slot:
        await slot.frames.aclose()
        await slot.upstream.send.send(kline(0))
        await slot.upstream.connected.wait()
        assert slot.reconnects() == {"error": 1} and slot.counters.reconnects == 1


async def test_a_failed_connect_is_counted_as_an_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    metrics, counters = Metrics(), ConnectionCounters()
    send, _receive = trio.open_memory_channel[FrameBurst](1)
    policy = ConnectionPolicy(reconnect_base_s=1.0, reconnect_cap_s=1.0)
    with real_time_limit(WAIT_S), trio.move_on_after(10.5):
        await run_binance_ws_connections(
            "ws://127.0.0.1:1",  # nothing listens there
            send,
            policy=policy,
            stale_timeout_s=60,
            metrics=metrics,
            counters=counters,
            name="test",
        )
    failed = metrics.registry.get_sample_value(
        "tradecanvas_upstream_reconnects_total", {"reason": "error"}
    )
    assert failed is not None and failed >= 5 and counters.connected == 0
    assert counters.reconnects == failed


async def test_an_unreachable_exchange_is_said_once_and_its_return_too(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Offline, every connect fails and each failure has its line; after UNREACHABLE_AFTER
    in a row one line more says what it means, once (not per retry), and the connection
    that finally opens says the outage is over."""
    with socket.socket() as probe:  # a port nothing listens on, until the test says
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    send, _receive = trio.open_memory_channel[FrameBurst](10)
    policy = ConnectionPolicy(reconnect_base_s=1.0, reconnect_cap_s=1.0)
    upstream = ScriptedUpstream()

    def said(text: str) -> list[str]:
        return [r.getMessage() for r in caplog.records if text in r.getMessage()]

    caplog.set_level(logging.INFO, logger="tradecanvas.upstream.binance_ws")
    with real_time_limit(WAIT_S):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(
                functools.partial(
                    run_binance_ws_connections,
                    f"ws://127.0.0.1:{port}/market",
                    send,
                    policy=policy,
                    stale_timeout_s=3600,
                    metrics=Metrics(),
                    counters=ConnectionCounters(),
                    name="binance futures (1 streams)",
                )
            )
            # a few retries past the one that was said: each of them says nothing more
            await trio.sleep(3 * UNREACHABLE_AFTER * (policy.reconnect_cap_s + 1))
            assert len(said("connect failed")) > UNREACHABLE_AFTER + 1
            await nursery.start(
                functools.partial(
                    trio_websocket.serve_websocket,
                    upstream.handler,
                    "127.0.0.1",
                    port,
                    ssl_context=None,
                )
            )
            await upstream.connected.wait()
            await trio.testing.wait_all_tasks_blocked()  # the client's side of it too
            nursery.cancel_scope.cancel()
    (unreachable,) = said("Binance unreachable")
    match = re.fullmatch(
        r"binance futures \(1 streams\): Binance unreachable since (\d\d:\d\dZ)"
        rf" \(127\.0\.0\.1:{port}\): no data will arrive until it answers \(offline\?"
        r" the README's tour uses `tradecanvas replay`\)",
        unreachable,
    )
    assert match is not None, unreachable
    failed = len(said("connect failed"))
    assert said("connected again") == [
        f"binance futures (1 streams): connected again (unreachable since {match[1]},"
        f" {failed} failed connects)"
    ]


async def test_server_shutdown_after_an_hour_rotates_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A connection that proved healthy (lived ``healthy_after_s``) is replaced at once when
    Binance announces serverShutdown, make-before-break: no hole, and the old connection
    goes only once the new one delivered."""
    async with connection_slot(ConnectionPolicy(), stale_timeout_s=1e9) as slot:
        await trio.sleep(3600)
        announced = trio.current_time()
        connected = slot.upstream.connected
        await slot.upstream.sockets[0].send_message(SHUTDOWN)
        await connected.wait()
        assert trio.current_time() - announced < 0.5
        assert not slot.upstream.ended[0].is_set()
        await slot.upstream.sockets[1].send_message(kline(0))
        assert [(await slot.frames.receive()).generation for _ in range(2)] == [1, 2]
        await slot.upstream.ended[0].wait()
        assert slot.reconnects() == {"server_shutdown": 1}


async def test_server_shutdown_right_after_every_connect_is_backed_off(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint announcing serverShutdown right after every connect (and never closing)
    is backed off like one that drops: the waits double up to the cap, instead of a connect
    a second for ever (600 per 5 min with two connections; Binance allows 300 per IP). The
    old connection stays open, and delivers, until its successor does: no hole."""
    monkeypatch.setattr(Backoff, "delay", Backoff.ceiling)  # the longest wait of each step
    policy = ConnectionPolicy(reconnect_base_s=1.0, reconnect_cap_s=60.0, healthy_after_s=60)
    async with connection_slot(policy, stale_timeout_s=1e9) as slot:
        upstream = slot.upstream
        start = trio.current_time()
        while trio.current_time() - start < 300:
            newest = upstream.sockets[-1]
            connected = upstream.connected
            await newest.send_message(SHUTDOWN)
            assert (await slot.frames.receive()).raws == [SHUTDOWN]
            await newest.send_message(kline(0))  # backing off: the old one still delivers
            assert (await slot.frames.receive()).raws == [kline(0)]
            await connected.wait()
            assert not upstream.ended[-2].is_set()  # make-before-break
            await upstream.sockets[-1].send_message(kline(1))
            assert (await slot.frames.receive()).raws == [kline(1)]
            await upstream.ended[-2].wait()
        gaps = [round(b - a) for a, b in itertools.pairwise(upstream.connected_at)]
        assert gaps == [1, 2, 4, 8, 16, 32, 60, 60, 60, 60]  # 11 connects in 5 min, not 300
        assert slot.reconnects() == {"server_shutdown": len(gaps)}


async def test_connections_to_one_host_start_at_least_a_second_apart(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Binance limits connection attempts per IP: the slots of one process (more than 200
    streams are several connections) share one pacer per host, at start-up and when they
    all lose their connections at once."""
    upstream = ScriptedUpstream()
    with real_time_limit(WAIT_S):
        async with trio.open_nursery() as nursery:
            url = await upstream.start(nursery)
            for i in range(3):
                send, _receive = trio.open_memory_channel[FrameBurst](100)
                nursery.start_soon(
                    functools.partial(
                        run_binance_ws_connections,
                        url,
                        send,
                        policy=ConnectionPolicy(),
                        stale_timeout_s=1e9,
                        metrics=Metrics(),
                        counters=ConnectionCounters(),
                        name=f"test {i}",
                    )
                )
            while upstream.connections < 3:
                await upstream.connected.wait()
            await trio.sleep(3600)  # healthy: the drops below back off one small step
            for ws in upstream.sockets:
                await ws.aclose(code=1001, reason="going away")
            while upstream.connections < 6:
                await upstream.connected.wait()
            nursery.cancel_scope.cancel()
    gaps = [b - a for a, b in itertools.pairwise(upstream.connected_at)]
    assert min(gaps) >= 1.0, gaps
    assert upstream.connected_at[2] - upstream.connected_at[0] < 2.5  # no more than needed


async def test_a_slot_that_never_gets_a_frame_names_the_likely_cause(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """An unrouted futures URL (no /market) is accepted by Binance, which then sends
    nothing: after three stale ends without a single frame, the log says why."""
    with caplog.at_level(logging.WARNING, logger="tradecanvas.upstream.binance_ws"):
        async with connection_slot(ConnectionPolicy(), stale_timeout_s=10) as slot:
            while slot.upstream.connections < SILENT_WARN_AFTER + 1:
                await slot.upstream.connected.wait()
    hints = [r.getMessage() for r in caplog.records if "/market route" in r.getMessage()]
    assert len(hints) == 1
    assert "test: no frame has ever arrived (3 connections went stale)" in hints[0]
    assert "TRADE_CANVAS_BINANCE_FUTURES_WS_URL" in hints[0]


async def test_a_slot_that_got_frames_before_going_stale_blames_no_route(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tradecanvas.upstream.binance_ws"):
        async with connection_slot(ConnectionPolicy(), stale_timeout_s=10) as slot:
            await slot.upstream.send.send(kline(0))
            while slot.upstream.connections < SILENT_WARN_AFTER + 2:
                await slot.upstream.connected.wait()
    assert slot.reconnects() == {"stale": SILENT_WARN_AFTER + 1}
    assert not [r for r in caplog.records if "no frame has ever arrived" in r.getMessage()]


async def test_a_frame_over_the_size_limit_is_said_to_be_closed_by_this_daemon(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """trio-websocket closes a connection whose frame is over the size limit with 1009: the
    log line blamed Binance for it ("closed by Binance: … 1009 …")."""
    send, _receive = trio.open_memory_channel[FrameBurst](10)
    upstream = ScriptedUpstream()
    caplog.set_level(logging.INFO, logger="tradecanvas.upstream.binance_ws")
    with real_time_limit(WAIT_S):
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                functools.partial(
                    trio_websocket.serve_websocket,
                    upstream.handler,
                    "127.0.0.1",
                    0,
                    ssl_context=None,
                )
            )
            port = server.port
            nursery.start_soon(
                functools.partial(
                    run_binance_ws_connections,
                    f"ws://127.0.0.1:{port}/market",
                    send,
                    policy=ConnectionPolicy(reconnect_base_s=1.0, reconnect_cap_s=1.0),
                    stale_timeout_s=3600,
                    metrics=Metrics(),
                    counters=ConnectionCounters(),
                    name="binance futures (1 streams)",
                )
            )
            await upstream.connected.wait()
            await upstream.send.send("x" * (MAX_MESSAGE_BYTES + 1))
            await upstream.ended[0].wait()
            await upstream.connected.wait()  # and it reconnects
            nursery.cancel_scope.cancel()
    ended = [r.getMessage() for r in caplog.records if "connection ended" in r.getMessage()]
    assert len(ended) == 1 and "closed by this daemon: a frame over the size limit" in ended[0]
    assert "by Binance" not in ended[0]
