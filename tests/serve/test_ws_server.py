"""The /ws/market server, the trio shell: every message type on the wire, refusals, 404 and
Origin 403, 1009, the rate limit's 1008, shutdown 1001, client closes.

Real trio-websocket clients against a real server on 127.0.0.1 port 0 and a real SQLite
store; the helpers at the top are shared with the other tests under tests/serve,
tests/tools/test_subscribe.py and the daemon tests. The protocol rules themselves are tested
without sockets in tests/serve/test_ws_protocol.py.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
import trio
import trio_websocket

from tests.conftest import binance_data_dir, read_kline_csv
from tests.pipeline.test_commit import RecordingTarget
from tests.serve.test_ws_protocol import BAD_MESSAGES
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.runtime_flags import DEFAULT_ALLOWED_ORIGINS
from tradecanvas.serve.hub import Hub
from tradecanvas.serve.ws_protocol import (
    MAX_MESSAGE_BYTES,
    InboundLimits,
)
from tradecanvas.serve.ws_server import serve_ws_market
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.json import dumps, loads

SERIES_1M: Final = SeriesId.parse("binance:futures:BTC/USDT:1m")
SERIES_5M: Final = SERIES_1M.with_timeframe(Timeframe.parse("5m"))
SID_1M: Final = str(SERIES_1M)
SID_5M: Final = str(SERIES_5M)
FUTURES_WEEK: Final = "klines_1m_5m/futures_um/BTCUSDT-{tf}-2025-07-06_2025-07-12.csv"
# a safety net against a hung test, not a wait for anything
RECEIVE_TIMEOUT_S: Final = 10.0


# --- shared helpers -------------------------------------------------------------------


@functools.cache
def real_candles(tf: str = "1m") -> tuple[Candle, ...]:
    """A week of real USDⓈ-M BTCUSDT candles (2025-07-06 … 07-12)."""
    return tuple(read_kline_csv(binance_data_dir() / FUTURES_WEEK.format(tf=tf)))


@attrs.frozen
class Market:
    hub: Hub
    metrics: Metrics
    port: int

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws/market"


@asynccontextmanager
async def running_market(
    store: Any,
    *,
    series: Sequence[SeriesId] = (SERIES_1M, SERIES_5M),
    queue_max: int = 1024,
    send_timeout_s: float = 5.0,
    catchup_limit: int = 5000,
    max_lag_s: float | None = None,
    allowed_origins: Sequence[str] = DEFAULT_ALLOWED_ORIGINS,
    max_subscriptions: int = 64,
    limits: InboundLimits | None = None,
) -> AsyncIterator[Market]:
    """A Hub and serve_ws_market on 127.0.0.1 port 0, cancelled on exit."""
    metrics = Metrics()
    hub = Hub(
        store,
        series=series,
        queue_max=queue_max,
        send_timeout_s=send_timeout_s,
        catchup_limit=catchup_limit,
        metrics=metrics,
        max_lag_s=max_lag_s,
    )
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            functools.partial(
                serve_ws_market,
                hub,
                host="127.0.0.1",
                port=0,
                allowed_origins=allowed_origins,
                max_subscriptions=max_subscriptions,
                limits=limits,
            )
        )
        yield Market(hub, metrics, port)
        nursery.cancel_scope.cancel()


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    yield opened
    await opened.aclose()


async def send(ws: trio_websocket.WebSocketConnection, message: object) -> None:
    await ws.send_message(message if isinstance(message, str | bytes) else dumps(message))


async def receive(ws: trio_websocket.WebSocketConnection) -> dict[str, Any]:
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        raw = await ws.get_message()
    doc = loads(raw)
    assert isinstance(doc, dict), raw
    return doc


async def until_pong(ws: trio_websocket.WebSocketConnection) -> list[dict[str, Any]]:
    """Ping and collect everything before the pong (the server answers in order)."""
    await send(ws, {"type": "ping"})
    messages: list[dict[str, Any]] = []
    while (message := await receive(ws))["type"] != "pong":
        messages.append(message)
    return messages


async def close_code_of(ws: trio_websocket.WebSocketConnection) -> int | None:
    """Read until the server closes; the close code it sent."""
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        try:
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed as exc:
            return exc.reason.code if exc.reason is not None else None


def closed_times(messages: Sequence[dict[str, Any]], series_id: str | None = None) -> list[int]:
    times: list[int] = []
    for m in messages:
        if series_id is not None and m.get("series_id") != series_id:
            continue
        if m["type"] == "candles_batch":
            times.extend(c["candle_time"] for c in m["candles"])
        elif m["type"] == "candle_closed":
            times.append(m["candle"]["candle_time"])
    return times


def subscription_count(hub: Hub) -> int:
    """Subscriptions held by every attached connection."""
    return sum(len(subscriber.queue.subscriptions) for subscriber in hub.subscribers())


def subscribe_msg(
    series_id: str = SID_1M, since: int | None = None, batch: bool = False
) -> dict[str, object]:
    return {"type": "subscribe", "series_id": series_id, "since": since, "supports_batch": batch}


@asynccontextmanager
async def connect(
    port: int,
    *,
    path: str = "/ws/market",
    origin: bytes | None = None,
    receive_buffer: int | None = None,
    message_queue_size: int = 8,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A trio-websocket client on a TCP stream we own and always close (trio-websocket's
    own client leaves its socket open when the server closes first).

    ``receive_buffer`` shrinks the kernel receive buffer: with a 1-message queue and no
    reads, the server's sends back up after a few messages."""
    sock = trio.socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    stream = trio.SocketStream(sock)
    try:
        await sock.connect(("127.0.0.1", port))
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                stream,
                "127.0.0.1",
                path,
                extra_headers=[(b"Origin", origin)] if origin is not None else None,
                message_queue_size=message_queue_size,
            )
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True, deadline=trio.current_time() + 2):
                    await ws.aclose()
                nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


# --- the server, with real clients ----------------------------------------------------


async def test_round_trip_of_every_message_type(store: CandleStore) -> None:
    minutes = real_candles("1m")[:12]
    fives = real_candles("5m")[:2]
    await store.upsert(SID_1M, minutes[:10], "ws")
    await store.upsert(SID_5M, fives[:1], "derived")
    t = [c.candle_time for c in minutes]
    async with (
        running_market(store) as market,
        connect(market.port) as ws,
    ):
        # subscribe (batch) → candles_batch; subscribe (plain) → candle_closed
        await send(ws, subscribe_msg(SID_1M, since=t[7], batch=True))
        await send(ws, subscribe_msg(SID_5M, since=None, batch=False))
        caught_up = await until_pong(ws)
        assert caught_up[0] == {
            "type": "candles_batch",
            "series_id": SID_1M,
            "candles": [minutes[8].to_wire(), minutes[9].to_wire()],
        }
        assert caught_up[1] == {
            "type": "candle_closed",
            "series_id": SID_5M,
            "candle": fives[0].to_wire(),
        }
        assert len(caught_up) == 2
        # candle_forming
        market.hub.publish_forming(SID_1M, minutes[10])
        assert await receive(ws) == {
            "type": "candle_forming",
            "series_id": SID_1M,
            "candle": minutes[10].to_wire(),
        }
        # gap: the store has no minute 10 either, so minute 11 comes after a gap
        await store.upsert(SID_1M, [minutes[11]], "ws")
        assert market.hub.publish_closed(SID_1M, [minutes[11]]) == []
        assert await receive(ws) == {
            "type": "gap",
            "series_id": SID_1M,
            "expected_next_time": t[10],
            "actual_time": t[11],
        }
        assert closed_times([await receive(ws)]) == [t[11]]
        # system
        event = SystemEvent(SID_1M, "backfill", t[10], t[10])
        market.hub.publish_system(event)
        assert await receive(ws) == event.to_wire()
        # error, then unsubscribe, then pong
        await send(ws, {"type": "subscribe"})
        error = await receive(ws)
        assert error["type"] == "error" and error["code"] == "bad_request"
        await send(ws, {"type": "unsubscribe", "series_id": SID_1M})
        assert await until_pong(ws) == []
        market.hub.publish_forming(SID_1M, minutes[11])
        market.hub.publish_forming(SID_5M, fives[1])
        assert (await receive(ws))["series_id"] == SID_5M


# every bad message's parsing is tests/serve/test_ws_protocol.py's; a sample of kinds here
BAD_ON_THE_WIRE: Final = [
    m for m in BAD_MESSAGES if m[1] in ("not valid JSON", "got a JSON array", "got a boolean true")
]


@pytest.mark.parametrize(("raw", "says"), BAD_ON_THE_WIRE)
async def test_bad_messages_get_an_error_and_the_connection_stays_up(
    store: CandleStore, raw: str | bytes, says: str
) -> None:
    async with (
        running_market(store) as market,
        connect(market.port) as ws,
    ):
        await send(ws, raw)
        error = await receive(ws)
        assert error["type"] == "error"
        assert error["code"] == "bad_request"
        assert says in error["message"]
        await send(ws, subscribe_msg(SID_1M))
        assert await until_pong(ws) == []
        assert subscription_count(market.hub) == 1


async def test_unknown_series_and_too_many_subscriptions(store: CandleStore) -> None:
    eth = "binance:futures:ETH/USDT:1m"
    async with (
        running_market(store, max_subscriptions=1) as market,
        connect(market.port) as ws,
    ):
        for request in (subscribe_msg(eth), {"type": "unsubscribe", "series_id": eth}):
            await send(ws, request)
            error = await receive(ws)
            assert error["code"] == "unknown_series" and error["series_id"] == eth
            assert "not ingested or derived" in error["message"]
        await send(ws, subscribe_msg(SID_1M))
        await send(ws, subscribe_msg(SID_1M, since=5))  # a replacement is not one more
        await send(ws, subscribe_msg(SID_5M))
        error = await receive(ws)
        assert error["code"] == "too_many_subscriptions" and error["series_id"] == SID_5M
        assert "at most 1 subscriptions" in error["message"]
        await send(ws, {"type": "unsubscribe", "series_id": SID_1M})
        await send(ws, subscribe_msg(SID_5M))
        assert await until_pong(ws) == []
        (subscriber,) = market.hub.subscribers()
        cursors = {sid: sub.cursor for sid, sub in subscriber.queue.subscriptions.items()}
        assert cursors == {SID_5M: -1}


async def test_subscribing_again_replaces_the_cursor(store: CandleStore) -> None:
    minutes = real_candles()[:6]
    await store.upsert(SID_1M, minutes, "ws")
    t = [c.candle_time for c in minutes]
    async with (
        running_market(store) as market,
        connect(market.port) as ws,
    ):
        await send(ws, subscribe_msg(SID_1M, since=t[3]))
        assert closed_times(await until_pong(ws)) == t[4:]
        await send(ws, subscribe_msg(SID_1M, since=t[1], batch=True))
        again = await until_pong(ws)
        assert [m["type"] for m in again] == ["candles_batch"]
        assert closed_times(again) == t[2:]


async def handshake_rejection(
    port: int, path: str, origin: bytes | None = None
) -> trio_websocket.ConnectionRejected:
    """Open a WebSocket to ``path``; the server's rejection. (Our own TCP stream, closed here:
    trio-websocket's open_websocket_url leaves a rejected client socket open.)"""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    headers = [(b"Origin", origin)] if origin is not None else []
    rejections: list[trio_websocket.ConnectionRejected] = []
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                await trio_websocket.wrap_client_stream(
                    nursery, stream, "127.0.0.1", path, extra_headers=headers
                )
    except* trio_websocket.ConnectionRejected as group:
        rejections.extend(
            e for e in group.exceptions if isinstance(e, trio_websocket.ConnectionRejected)
        )
    finally:
        await stream.aclose()
    assert len(rejections) == 1, "the handshake was not rejected"
    return rejections[0]


async def test_other_paths_get_404_and_bad_origins_403(store: CandleStore) -> None:
    async with running_market(store) as market:
        for path in ("/", "/ws", "/ws/market/x", "/api/market/candles"):
            rejected = await handshake_rejection(market.port, path)
            assert rejected.status_code == 404
            assert rejected.body is not None and b"/ws/market" in rejected.body
        for origin in (b"http://evil.example", b"null", b"http://localhost.evil.example"):
            rejected = await handshake_rejection(market.port, "/ws/market", origin)
            assert rejected.status_code == 403
        for allowed in (b"http://localhost:5173", b"https://127.0.0.1"):
            async with connect(market.port, path="/ws/market?client=chart", origin=allowed) as ws:
                assert await until_pong(ws) == []
        assert market.hub.statistics().subscribers <= 2


async def test_star_allows_any_origin(store: CandleStore) -> None:
    async with (
        running_market(store, allowed_origins=["*"]) as market,
        connect(market.port, origin=b"https://charts.example") as ws,
    ):
        assert await until_pong(ws) == []


async def test_a_message_over_64_kib_closes_with_1009_and_others_carry_on(
    store: CandleStore,
) -> None:
    async with (
        running_market(store) as market,
        connect(market.port) as other,
        connect(market.port) as ws,
    ):
        # exactly the limit is still a message (and gets an answer)
        await send(ws, " " * (MAX_MESSAGE_BYTES - 2) + "{}")
        assert (await receive(ws))["code"] == "bad_request"
        await send(ws, '{"type":"ping","pad":"' + "x" * MAX_MESSAGE_BYTES + '"}')
        assert await close_code_of(ws) == 1009
        assert await until_pong(other) == []
        await market.hub.wait_subscribers(1)
        text = market.metrics.render().decode()
        assert 'tradecanvas_subscriber_disconnects_total{reason="message_too_big"} 1.0' in text


async def test_rate_limit_answers_rate_limited_then_closes_1008(store: CandleStore) -> None:
    limits = InboundLimits(messages_per_s=5, burst=10, abuse_after_s=0.3)
    async with (
        running_market(store, limits=limits) as market,
        connect(market.port) as ws,
    ):
        for _ in range(15):
            await send(ws, {"type": "ping"})
        # the burst goes through; the first refused one is answered, the others are
        # ignored (a token may come back while the 15 are sent: another pong)
        answers = [await receive(ws) for _ in range(11)]
        assert answers[:10] == [{"type": "pong"}] * 10
        while answers[-1]["type"] == "pong":
            answers.append(await receive(ws))
        assert answers[-1]["code"] == "rate_limited"
        assert "at most 5/s" in answers[-1]["message"]
        # keep flooding: after 0.3 s over the limit the server closes with 1008
        got: list[int | None] = []

        async def read_until_closed() -> None:
            got.append(await close_code_of(ws))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_closed)
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                try:
                    while not got:
                        await send(ws, {"type": "ping"})
                except trio_websocket.ConnectionClosed:
                    pass
        assert got == [1008]
        await market.hub.wait_subscribers(0)
        text = market.metrics.render().decode()
        assert 'tradecanvas_subscriber_disconnects_total{reason="rate_limited"} 1.0' in text


async def test_binary_frames_are_json_too(store: CandleStore) -> None:
    async with (
        running_market(store) as market,
        connect(market.port) as ws,
    ):
        await send(ws, b'{"type":"ping"}')
        assert await receive(ws) == {"type": "pong"}


async def test_shutdown_closes_every_subscriber_with_1001(store: CandleStore) -> None:
    metrics_holder: list[Market] = []
    codes: list[int | None] = []
    async with trio.open_nursery() as clients, running_market(store) as market:
        metrics_holder.append(market)

        ready: list[None] = []
        all_ready = trio.Event()

        async def client() -> None:
            async with connect(market.port) as ws:
                await send(ws, subscribe_msg())
                await until_pong(ws)
                ready.append(None)
                if len(ready) == 3:
                    all_ready.set()
                codes.append(await close_code_of(ws))

        for _ in range(3):
            clients.start_soon(client)
        await all_ready.wait()
        # leaving running_market cancelled serve_ws_market
    assert codes == [1001, 1001, 1001]
    market = metrics_holder[0]
    assert market.hub.statistics().subscribers == 0
    text = market.metrics.render().decode()
    assert 'tradecanvas_subscriber_disconnects_total{reason="shutdown"} 3.0' in text
    assert "tradecanvas_subscribers 0.0" in text


async def test_client_close_is_counted_and_frees_the_subscriber(store: CandleStore) -> None:
    async with running_market(store) as market:
        async with connect(market.port) as ws:
            await send(ws, subscribe_msg())
            await until_pong(ws)
            assert subscription_count(market.hub) == 1
        await market.hub.wait_subscribers(0)
        assert subscription_count(market.hub) == 0
        text = market.metrics.render().decode()
        assert 'tradecanvas_subscriber_disconnects_total{reason="client_closed"} 1.0' in text
        # nothing is reported for a clean close
        assert market.hub.publish_closed(SID_1M, real_candles()[:1]) == []


async def test_the_port_is_reported_only_once_listening(store: CandleStore) -> None:
    async with running_market(store) as market:
        stream = await trio.open_tcp_stream("127.0.0.1", market.port)
        await stream.aclose()
    with pytest.raises(OSError, match="connect"):
        await trio.open_tcp_stream("127.0.0.1", market.port)


async def test_garbage_and_plain_http_do_not_disturb_subscribers(store: CandleStore) -> None:
    async with running_market(store) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg())
        for request in (
            b"GET /ws/market HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(100),  # a TLS hello
            b"not http at all\r\n\r\n",
        ):
            stream = await trio.open_tcp_stream("127.0.0.1", market.port)
            await stream.send_all(request)
            answer = b""
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                while chunk := await stream.receive_some(4096):
                    answer += chunk
            await stream.aclose()
            assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
        assert await until_pong(ws) == []
        assert market.hub.statistics().subscribers == 1


async def test_events_resume_by_cursor_across_a_restart(tmp_path: Path) -> None:
    """Stored events after ``events_after`` come first, in order, then live ones; a reopened
    store (a restarted daemon) keeps ids and events; an old cursor is told it is truncated."""
    path = tmp_path / "events.sqlite3"
    store = await CandleStore.open(path)
    pipeline = IngestPipeline(store, RecordingTarget(), [Timeframe.parse("5m")], "fp")
    minutes = list(real_candles())
    first = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[:10], "ws"))
    revised = [attrs.evolve(minutes[3], volume=minutes[3].volume + 1)]
    second = await pipeline.run(IngestBatch.of(SERIES_1M, revised, "rest"))
    await store.aclose()
    store = await CandleStore.open(path)  # the daemon restarted
    try:
        ids = [e.event_id for e in (*first.events, *second.events) if e.series_id == SID_1M]
        async with running_market(store) as market, connect(market.port) as ws:
            await send(
                ws, subscribe_msg(SID_1M, since=minutes[9].candle_time) | {"events_after": 0}
            )
            got = await until_pong(ws)
            assert [m["event_id"] for m in got if m["type"] == "system"] == ids
            assert [m["data"]["reason"] for m in got if m["type"] == "system"] == [
                "new_series",
                "revision",
            ]
            # the cursor resumes after the first: only the second comes again
            await send(
                ws, subscribe_msg(SID_1M, since=minutes[9].candle_time) | {"events_after": ids[0]}
            )
            again = await until_pong(ws)
            assert [m["event_id"] for m in again if m["type"] == "system"] == ids[1:]
            # a malformed cursor is refused and changes nothing
            await send(ws, subscribe_msg(SID_1M) | {"events_after": "x"})
            refused = await receive(ws)
            assert refused["type"] == "error" and "events_after" in refused["message"]
    finally:
        await store.aclose()
