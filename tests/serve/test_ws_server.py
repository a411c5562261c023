"""/ws/market on the WS port (trio-websocket): paths other than /ws/market get 404, garbage
and plain HTTP disturb nobody, the port is reported once listening.

Real trio-websocket clients against a real server on 127.0.0.1 port 0 and a real SQLite
store. The helpers at the top — :func:`running_market` serves one Hub and endpoint on the
WS port and, with ``over="http_port"``, on the HTTP port as the daemon does — are shared
with the other tests under tests/serve, tests/tools/test_subscribe.py and the daemon tests.
What a connection does once accepted is the session's, tested over both ports in
tests/serve/test_ws_session.py; the protocol rules themselves without sockets in
tests/serve/test_ws_protocol.py.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, cast

import attrs
import pytest
import trio
import trio_websocket
from starlette.applications import Starlette
from wsproto.utilities import LocalProtocolError

from tests.conftest import binance_data_dir, read_kline_csv
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.runtime_flags import DEFAULT_ALLOWED_ORIGINS
from tradecanvas.serve.http_server import serve_http
from tradecanvas.serve.hub import Hub
from tradecanvas.serve.shedding import MAX_HTTP_CONNECTIONS, ClientSockets, http_gate
from tradecanvas.serve.ws_asgi import market_websocket_routes
from tradecanvas.serve.ws_protocol import InboundLimits
from tradecanvas.serve.ws_server import (
    MAX_PENDING_HANDSHAKES,
    _HeadFirst,
    _read_request_head,
    serve_ws_port,
)
from tradecanvas.serve.ws_session import DEFAULT_STALL_TIMEOUT_S, MarketEndpoint
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.json import dumps, loads

SERIES_1M: Final = SeriesId.parse("binance:futures:BTC/USDT:1m")
SERIES_5M: Final = SERIES_1M.with_timeframe(Timeframe.parse("5m"))
SID_1M: Final = str(SERIES_1M)
SID_5M: Final = str(SERIES_5M)
FUTURES_WEEK: Final = "klines_1m_5m/futures_um/BTCUSDT-{tf}-2025-07-06_2025-07-12.csv"
# a safety net against a hung test, not a wait for anything
RECEIVE_TIMEOUT_S: Final = 10.0
# the two ports /ws/market is served on: its own, and the HTTP API's (DESIGN §10)
TRANSPORTS: Final = ("ws_port", "http_port")


# --- shared helpers -------------------------------------------------------------------


@functools.cache
def real_candles(tf: str = "1m") -> tuple[Candle, ...]:
    """A week of real USDⓈ-M BTCUSDT candles (2025-07-06 … 07-12)."""
    return tuple(read_kline_csv(binance_data_dir() / FUTURES_WEEK.format(tf=tf)))


@attrs.frozen
class Market:
    hub: Hub
    endpoint: MarketEndpoint
    metrics: Metrics
    port: int  # where the test's clients connect: the WS port, or the HTTP port
    ws_port: int
    http_port: int | None

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
    over: str = "ws_port",
    ws_port: int = 0,
    stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S,
    max_connections: int | None = None,
    max_pending_handshakes: int = MAX_PENDING_HANDSHAKES,
    max_http_connections: int = MAX_HTTP_CONNECTIONS,
    sockets: ClientSockets | None = None,
    http_url: str | None = None,
) -> AsyncIterator[Market]:
    """A Hub and its endpoint on the WS port (127.0.0.1, ``ws_port``; 0: any) and, with
    ``over="http_port"``, on the HTTP port too; ``Market.port`` is the one ``over`` names.
    Both ports share ``sockets`` (no limit by default), as in the daemon. On exit it stops
    as the daemon does: every session closed with 1001, then both servers cancelled."""
    sockets = ClientSockets(None) if sockets is None else sockets
    assert over in TRANSPORTS
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
    endpoint = MarketEndpoint(
        hub,
        allowed_origins=allowed_origins,
        max_subscriptions=max_subscriptions,
        limits=limits,
        stall_timeout_s=stall_timeout_s,
        max_connections=max_connections,
    )
    async with trio.open_nursery() as nursery:
        bound_ws = await nursery.start(
            functools.partial(
                serve_ws_port,
                endpoint,
                host="127.0.0.1",
                port=ws_port,
                max_pending_handshakes=max_pending_handshakes,
                sockets=sockets,
                http_url=http_url,
            )
        )
        http_port: int | None = None
        if over == "http_port":
            app = Starlette(routes=market_websocket_routes(endpoint))
            http_port = await nursery.start(
                functools.partial(
                    serve_http,
                    app,
                    host="127.0.0.1",
                    port=0,
                    gate=http_gate(sockets, metrics, limit=max_http_connections),
                )
            )
        port = bound_ws if http_port is None else http_port
        yield Market(hub, endpoint, metrics, port, bound_ws, http_port)
        endpoint.shutdown()
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


class QuickAckStream(trio.abc.HalfCloseableStream):
    """A client's SocketStream that acknowledges what it has read at once (``TCP_QUICKACK``).

    The kernel delays an acknowledgement by up to 40 ms of real time; under the autojump
    clock the daemon's stall watch would see those milliseconds as seconds of a client
    acknowledging nothing. A reading client acknowledges at once here, as it effectively
    does on a real clock."""

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        data = await self.inner.receive_some(max_bytes)
        if self.inner.socket.fileno() != -1:
            self.inner.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        await self.inner.send_all(data)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def aclose(self) -> None:
        await self.inner.aclose()


@asynccontextmanager
async def connect(
    port: int,
    *,
    path: str = "/ws/market",
    origin: bytes | None = None,
    receive_buffer: int | None = None,
    message_queue_size: int = 8,
    quick_ack: bool = False,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """A trio-websocket client on a TCP stream we own and always close (trio-websocket's
    own client leaves its socket open when the server closes first).

    ``receive_buffer`` shrinks the kernel receive buffer: with a 1-message queue and no
    reads, the server's sends back up after a few messages. ``quick_ack``: acknowledge
    what is read at once (:class:`QuickAckStream`; for tests of the stall timeout under
    the autojump clock)."""
    sock = trio.socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    stream = trio.SocketStream(sock)
    try:
        await sock.connect(("127.0.0.1", port))
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(
                nursery,
                # typed for socket streams; any Stream works (it only reads and writes)
                cast("trio.SocketStream", QuickAckStream(stream)) if quick_ack else stream,
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
    except* LocalProtocolError:
        # trio-websocket answers a ping it reads after our close (the daemon's read proofs)
        # in its closing state, and its reader fails: python-trio/trio-websocket#184
        pass
    finally:
        await stream.aclose()


# --- the server, with real clients ----------------------------------------------------


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


async def _answer(port: int, request: bytes) -> bytes:
    """Everything the server sends for ``request`` until it closes the connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(request)
        answer = b""
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            while chunk := await stream.receive_some(4096):
                answer += chunk
        return answer
    finally:
        await stream.aclose()


@pytest.mark.parametrize(
    ("http_url", "where"),
    [
        ("http://127.0.0.1:8766/", "http://127.0.0.1:8766/"),
        (None, "the HTTP port (TRADE_CANVAS_HTTP_PORT, 8766 by default)"),
    ],
)
async def test_a_plain_http_request_on_the_ws_port_is_told_where_the_chart_is(
    store: CandleStore, http_url: str | None, where: str
) -> None:
    """A browser or curl pointed at the WS port got a bare 400 with an empty body; now a
    426 Upgrade Required (RFC 9110: with ``Upgrade``) and a line saying where to go."""
    text = (
        f"this port serves WebSocket /ws/market only; the chart and the HTTP API are on {where}\n"
    )
    async with running_market(store, http_url=http_url) as market:
        assert market.port == market.ws_port
        answer = await _answer(
            market.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/html\r\n\r\n"
        )
        head, _, body = answer.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        assert lines[0] == "HTTP/1.1 426 Upgrade Required"
        assert {"Upgrade: websocket", "Connection: Upgrade, close"} <= set(lines)
        assert "Content-Type: text/plain; charset=utf-8" in lines
        assert f"Content-Length: {len(body)}" in lines
        assert body.decode() == text
        # HEAD: the same head, no body
        answer = await _answer(market.port, b"HEAD /ws/market HTTP/1.1\r\nHost: x\r\n\r\n")
        assert answer == head + b"\r\n\r\n"
        # an upgrade that lacks a header is still trio-websocket's to refuse (no text)
        answer = await _answer(
            market.port,
            b"GET /ws/market HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\n\r\n",
        )
        assert answer.startswith(b"HTTP/1.1 400") and b"this port serves" not in answer
        # and a WebSocket client is served as before
        async with connect(market.port) as ws:
            assert await until_pong(ws) == []


async def test_a_request_head_read_in_pieces_reaches_trio_websocket_whole() -> None:
    """What the WS port reads to tell plain HTTP from an upgrade is given back first:
    trio-websocket reads the same bytes, however the client's request was cut."""
    client, server = trio.testing.memory_stream_pair()
    request = (
        b"GET /ws/market HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    )
    pieces = [request[:5], request[5:40], request[40:] + b"\x81\x00"]  # a frame right after
    async with trio.open_nursery() as nursery:

        async def write() -> None:
            for piece in pieces:
                await client.send_all(piece)
                await trio.testing.wait_all_tasks_blocked()

        nursery.start_soon(write)
        head, parsed = await _read_request_head(server)
    assert parsed is not None and parsed.target == b"/ws/market"
    assert head == request + b"\x81\x00"
    replayed = _HeadFirst(server, head)
    assert await replayed.receive_some(10) == head[:10]
    assert await replayed.receive_some() == head[10:]
    await client.send_all(b"more")
    assert await replayed.receive_some() == b"more"
    # not HTTP: no request, and what was read is kept for trio-websocket to refuse
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"\x16\x03\x01\x02\x00\r\n")
    assert await _read_request_head(server) == (b"\x16\x03\x01\x02\x00\r\n", None)
    # the input ends before the head does: no request
    client, server = trio.testing.memory_stream_pair()
    await client.send_all(b"GET / HTTP/1.1\r\n")
    await client.send_eof()
    assert await _read_request_head(server) == (b"GET / HTTP/1.1\r\n", None)
