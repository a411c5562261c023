"""Hostile clients (issue 17, item 4; DESIGN §3, §5, §6): oversize frames, floods of
subscribe messages, more idle connections than the limit, frames that break the protocol,
more TCP connections than the open-file budget leaves, a wrong ``Origin``, writes without
or with a wrong token, slow-loris HTTP. Each is answered with a clear error or close code and
counted on /metrics, and a healthy subscriber beside them gets every candle once and in order.

Real servers on 127.0.0.1 port 0 (/ws/market on the WS port and on the HTTP port, the HTTP API
under Hypercorn), real trio-websocket and raw TCP clients, real SQLite stores, real time. The
number of idle connections is :func:`~tests.reliability.record.sized`: 200 under
``make test``, 2,000 under ``make soak``. One reliability line: faults = hostile attempts,
attempted / delivered = the candles published to / received by the healthy subscriber.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Final

import httpx
import pytest
import trio
import trio.lowlevel
import trio_websocket
from wsproto.events import CloseConnection
from wsproto.extensions import PerMessageDeflate

from tests.conftest import flat_minutes
from tests.reliability.record import ReliabilityRecord, report, sized
from tests.reliability.test_subscriber_faults import allow_open_files
from tests.serve.test_client_faults import BOMB_BYTES, deflate_bomb, masked, send_raw
from tests.serve.test_http_api import INGEST, TOKEN, metric_value, running_api
from tests.serve.test_http_validation import body_for
from tests.serve.test_ws_admission import (
    UPGRADE,
    closed_unanswered,
    raw_streams,
    status_of,
    until,
)
from tests.serve.test_ws_server import (
    SID_1M,
    Market,
    close_code_of,
    closed_times,
    connect,
    handshake_rejection,
    receive,
    running_market,
    send,
    subscribe_msg,
    until_pong,
)
from tradecanvas.serve.http_server import hypercorn_config
from tradecanvas.serve.shedding import ClientSockets
from tradecanvas.serve.ws_protocol import MAX_MESSAGE_BYTES, InboundLimits
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.json import loads

pytestmark = pytest.mark.slow

T0: Final = 1751760000
# the flood is closed once refused for this long (DESIGN §6 says 5 s; shortened for the test)
ABUSE_AFTER_S: Final = 0.5
LIMITS: Final = InboundLimits(messages_per_s=20, burst=40, abuse_after_s=ABUSE_AFTER_S)
# a safety net against a hung test, not a wait for anything
CASE_TIMEOUT_S: Final = 60.0


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    yield opened
    await opened.aclose()


class Healthy:
    """A subscriber that must not notice any of it: after each case one more candle is
    committed and published, and it must arrive, next in order."""

    def __init__(self, market: Market, store: CandleStore, ws: trio_websocket.WebSocketConnection):
        self.market = market
        self.store = store
        self.ws = ws
        self.published: list[int] = []
        self.received: list[int] = []

    async def still_served(self) -> None:
        (candle,) = flat_minutes(T0 + 60 * len(self.published), 1)
        await self.store.upsert(SID_1M, [candle], "ws")
        self.published.append(candle.candle_time)
        self.market.hub.publish_closed(SID_1M, [candle])
        while len(self.received) < len(self.published):
            self.received.extend(closed_times([await receive(self.ws)]))
        assert self.received == self.published


def metric(market: Market, family: str, **labels: str) -> float:
    return metric_value(market.metrics.render().decode(), family, **labels)


async def oversize_frames(market: Market) -> int:
    """A message over 64 KiB and one of 16 MiB on each port, and a permessage-deflate
    message inflating to 32 MiB on the HTTP port (the only one agreeing to compression):
    closed with 1009."""
    huge = masked(0x81, b"x" * (16 << 20))
    bomb = masked(0xC1, deflate_bomb(BOMB_BYTES))
    for port in (market.ws_port, market.port):
        async with connect(port) as ws:
            await send(ws, "x" * (MAX_MESSAGE_BYTES + 1))
            assert await close_code_of(ws) == 1009
        closes = [e for e in await send_raw(port, huge) if isinstance(e, CloseConnection)]
        assert [c.code for c in closes] == [1009]
    events = await send_raw(market.port, bomb, [PerMessageDeflate()])
    assert [e.code for e in events if isinstance(e, CloseConnection)] == [1009]
    return 5


async def subscribe_flood(market: Market) -> int:
    """Subscribes as fast as the client can send: ``rate_limited`` errors, then 1008."""
    errors: list[str] = []
    async with connect(market.port) as ws:

        async def read() -> None:
            try:
                while True:
                    message = loads(await ws.get_message())
                    if message.get("type") == "error":
                        errors.append(message["code"])
            except trio_websocket.ConnectionClosed:
                pass

        sent = 0
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            code: int | None = None
            try:
                while True:
                    await send(ws, subscribe_msg(SID_1M, since=T0 + 60 * (sent % 1000)))
                    sent += 1
                    await trio.lowlevel.checkpoint()
            except trio_websocket.ConnectionClosed as exc:
                code = exc.reason.code if exc.reason is not None else None
    assert code == 1008
    assert "rate_limited" in errors
    return sent


async def idle_connections(market: Market, limit: int) -> int:
    """``limit`` connections that never say anything fill the limit (the healthy subscriber
    is one of them): the next is refused with 503 until one leaves."""
    async with AsyncExitStack() as idle:
        for _ in range(limit - 1):
            await idle.enter_async_context(connect(market.ws_port))
        await market.hub.wait_subscribers(limit)
        for port in (market.ws_port, market.port):
            refused = await handshake_rejection(port, "/ws/market")
            assert refused.status_code == 503
            assert refused.body is not None and b"too many connections" in refused.body
    await market.hub.wait_subscribers(1)
    async with connect(market.port) as ws:  # room again
        await until_pong(ws)
    return limit - 1 + 2


async def wrong_origin(market: Market) -> int:
    for port in (market.ws_port, market.port):
        refused = await handshake_rejection(port, "/ws/market", origin=b"https://evil.example")
        assert refused.status_code == 403
    return 2


async def slow_loris(port: int) -> int:
    """Request headers that never end: Hypercorn closes the connection after its keep-alive
    timeout (no request began), answering nothing."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    answer = b""
    try:
        await stream.send_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        with trio.fail_after(hypercorn_config([], 1).keep_alive_timeout + CASE_TIMEOUT_S):
            try:
                while True:  # a byte now and then, never the end of the headers
                    with trio.move_on_after(0.5):
                        if not (data := await stream.receive_some()):
                            break
                        answer += data
                    await stream.send_all(b"a")
            except trio.BrokenResourceError:
                pass  # closed under the next byte
    finally:
        await stream.aclose()
    assert answer == b""
    return 1


async def broken_frames(market: Market) -> int:
    """Frames that break RFC 6455 on each port: closed with 1002, or 1007 for text that is
    not UTF-8."""
    for port in (market.ws_port, market.port):
        for data, code in [(masked(0xC1, b"{}"), 1002), (masked(0x81, b"\xc3("), 1007)]:
            closes = [e for e in await send_raw(port, data) if isinstance(e, CloseConnection)]
            assert [c.code for c in closes] == [code]
    return 4


async def socket_flood(market: Market, sockets: ClientSockets) -> int:
    """Plain TCP connections on both ports until every client socket of the budget is taken:
    each one more is reset at accept, and the sockets come back when they close."""
    assert sockets.limit is not None and market.http_port is not None
    shed_before = metric(market, "tradecanvas_ws_handshakes_shed") + metric(
        market, "tradecanvas_http_connections_shed"
    )
    await until(lambda: sockets.count == 1)  # the healthy subscriber's, nothing else
    async with AsyncExitStack() as held:
        ports = [market.ws_port, market.http_port]
        while sockets.count < sockets.limit:
            expected = sockets.count + 1
            port = ports[expected % 2]
            (stream,) = await held.enter_async_context(raw_streams(port, 1))
            if port == market.ws_port:
                # a session: its end is seen at once (one that ends during its handshake
                # holds its place until the handshake timeout)
                await stream.send_all(UPGRADE)
                assert await status_of(stream) == 101
            await until(lambda: sockets.count == expected)  # noqa: B023 (awaited here)
        for port in ports * 5:
            assert await closed_unanswered(port)
    shed = metric(market, "tradecanvas_ws_handshakes_shed") + metric(
        market, "tradecanvas_http_connections_shed"
    )
    assert shed - shed_before == 10
    await until(lambda: sockets.count == 1)  # every place given back
    return 10


async def bad_tokens(tmp_path: Path) -> tuple[int, float, float]:
    """Writes without a token and with a wrong one: 401; with no token configured: 403.
    Nothing is written either way. Returns (attempts, 401s counted, 403s counted)."""
    async with running_api(tmp_path / "with-token") as api:
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}x"}):
            r = await api.client.post(INGEST, json=body_for(), headers=headers)
            assert r.status_code == 401 and r.json()["error"] == "unauthorized"
        assert await api.store.tail(SID_1M, 10) == []
        text = api.metrics.render().decode()
        unauthorized = metric_value(text, "tradecanvas_http_refusals", code="unauthorized")
    async with running_api(tmp_path / "without-token", token=None) as api:
        r = await api.client.post(INGEST, json=body_for(), headers={"Authorization": "Bearer x"})
        assert r.status_code == 403 and r.json()["error"] == "ingest_disabled"
        text = api.metrics.render().decode()
        disabled = metric_value(text, "tradecanvas_http_refusals", code="ingest_disabled")
    return 3, unauthorized, disabled


async def test_hostile_clients_are_answered_counted_and_hurt_nobody(
    store: CandleStore, tmp_path: Path
) -> None:
    limit = sized(200, 2000)
    allow_open_files(2 * limit + 512)
    # the client sockets both ports may hold: room for the idle connections' case
    sockets = ClientSockets(limit + 40)
    faults = 0
    async with (
        running_market(
            store, over="http_port", limits=LIMITS, max_connections=limit, sockets=sockets
        ) as market,
        connect(market.ws_port) as healthy_ws,
    ):
        await send(healthy_ws, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        await until_pong(healthy_ws)
        healthy = Healthy(market, store, healthy_ws)
        await healthy.still_served()
        with trio.fail_after(CASE_TIMEOUT_S):
            faults += await oversize_frames(market)
        await healthy.still_served()
        with trio.fail_after(CASE_TIMEOUT_S):
            faults += await subscribe_flood(market)
        await healthy.still_served()
        with trio.fail_after(CASE_TIMEOUT_S):
            faults += await wrong_origin(market)
        await healthy.still_served()
        with trio.fail_after(CASE_TIMEOUT_S):
            faults += await idle_connections(market, limit)
        await healthy.still_served()
        with trio.fail_after(CASE_TIMEOUT_S):
            faults += await broken_frames(market)
        await healthy.still_served()
        with trio.fail_after(CASE_TIMEOUT_S):
            faults += await socket_flood(market, sockets)
        await healthy.still_served()
        assert market.http_port is not None
        faults += await slow_loris(market.http_port)
        await healthy.still_served()

        assert metric(market, "tradecanvas_subscriber_disconnects", reason="message_too_big") == 5
        assert metric(market, "tradecanvas_subscriber_disconnects", reason="rate_limited") == 1
        assert metric(market, "tradecanvas_ws_refusals", reason="origin") == 2
        assert metric(market, "tradecanvas_ws_rate_limited") > 0
        assert metric(market, "tradecanvas_ws_refusals", reason="max_connections") == 2
        published, received = healthy.published, healthy.received

    attempts, unauthorized, disabled = await bad_tokens(tmp_path)
    faults += attempts
    assert (unauthorized, disabled) == (2, 1)
    line = report(
        ReliabilityRecord(
            test="hostile_clients",
            seed=0,
            faults=faults,
            attempted=len(published),
            stored=len(await store.tail(SID_1M, 1000)),
            delivered=len(received),
            lost=len(set(published) - set(received)),
            duplicated=len(received) - len(set(received)),
        )
    )
    assert '"lost":0,"duplicated":0' in line


async def test_an_http_client_is_unaffected_by_a_slow_loris(tmp_path: Path) -> None:
    """While a slow-loris connection holds its half-sent request, other requests are answered."""
    async with running_api(tmp_path) as api:
        stream = await trio.open_tcp_stream("127.0.0.1", api.port)
        try:
            await stream.send_all(b"POST /api/market/ingest/candle_closed HTTP/1.1\r\nHost: x\r\n")
            for _ in range(5):
                assert (await api.client.get("/healthz")).status_code == 200
        finally:
            await stream.aclose()
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{api.port}") as other:
            assert (await other.get("/healthz")).status_code == 200
