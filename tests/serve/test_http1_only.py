"""The HTTP port speaks HTTP/1.1 only: no HTTP/2 by prior knowledge (a GOAWAY, then the end),
no ``Upgrade: h2c`` (answered over HTTP/1.1), no WebSocket over HTTP/2 (RFC 8441); and a
request with both ``Content-Length`` and ``Transfer-Encoding`` gets 400 and the connection
ends. Real ``serve_http`` on 127.0.0.1, raw TCP clients."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Final

import pytest
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.events import ConnectionTerminated, Event, ResponseReceived
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from tradecanvas.serve.http1_only import HTTP2_REFUSAL
from tradecanvas.serve.http_server import serve_http

TIMEOUT_S: Final = 10.0


async def hello(request: Request) -> Response:
    body = await request.body()
    return PlainTextResponse(f"hello {request.method} {len(body)}")


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(await websocket.receive_text())


APP: Final = Starlette(
    routes=[Route("/", hello, methods=["GET", "POST"]), WebSocketRoute("/ws", echo)]
)


@asynccontextmanager
async def serving() -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        yield await nursery.start(functools.partial(serve_http, APP, host="127.0.0.1", port=0))
        nursery.cancel_scope.cancel()


async def read_to_end(stream: trio.SocketStream) -> bytes:
    """All the server sends until it ends the connection (fails after TIMEOUT_S)."""
    received = b""
    with trio.fail_after(TIMEOUT_S):
        while data := await stream.receive_some(65536):
            received += data
    return received


async def exchange(port: int, data: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)
        return await read_to_end(stream)


def h2_events(received: bytes) -> list[Event]:
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    return list(client.receive_data(received))


def h2_request(headers: list[tuple[str, str]]) -> bytes:
    client = H2Connection(H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, headers, end_stream=headers[0][1] != "CONNECT")
    return client.data_to_send()


async def test_http2_by_prior_knowledge_gets_a_goaway_and_the_end() -> None:
    async with serving() as port:
        request = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]
        received = await exchange(port, h2_request(request))
        assert received == HTTP2_REFUSAL
        events = h2_events(received)
        assert not any(isinstance(e, ResponseReceived) for e in events)
        (ended,) = [e for e in events if isinstance(e, ConnectionTerminated)]
        assert ended.error_code == ErrorCodes.HTTP_1_1_REQUIRED
        assert ended.last_stream_id == 0


async def test_a_websocket_over_http2_is_refused_with_its_connection() -> None:
    """RFC 8441's extended CONNECT: over HTTP/2 a WebSocket shares its TCP connection with
    other streams, and the port's protections of /ws/market (the read of its frames, the
    ping limit, one session per connection) would not hold."""
    async with serving() as port:
        connect = [
            (":method", "CONNECT"),
            (":protocol", "websocket"),
            (":scheme", "http"),
            (":path", "/ws"),
            (":authority", "x"),
            ("sec-websocket-version", "13"),
        ]
        assert await exchange(port, h2_request(connect)) == HTTP2_REFUSAL


async def test_the_http2_preface_after_a_request_ends_the_connection_too() -> None:
    async with serving() as port:
        received = await exchange(
            port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nPRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
        )
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        assert rest == b"hello GET 0" + HTTP2_REFUSAL


@pytest.mark.parametrize(
    "connection", [b"Upgrade, HTTP2-Settings", b"upgrade", b"keep-alive, Upgrade"]
)
async def test_an_h2c_upgrade_is_answered_over_http11(connection: bytes) -> None:
    """With or without HTTP2-Settings (a proxy forwarding any Upgrade sends ``Connection:
    upgrade``): no 101, the request is answered over HTTP/1.1, and the connection stays an
    HTTP/1.1 one (the next request on it is answered too)."""
    async with serving() as port:
        request = (
            b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: h2c\r\nConnection: %s\r\n"
            b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n" % connection
        )
        closing = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        received = await exchange(port, request + closing)
        assert received.count(b"HTTP/1.1 200") == 2, received
        assert b"101" not in received.split(b"\r\n")[0]
        assert received.count(b"hello GET 0") == 2


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (b"Content-Length: 4", b"Transfer-Encoding: chunked"),
        (b"Transfer-Encoding: chunked", b"Content-Length: 60"),
        (b"content-length: 0", b"TRANSFER-ENCODING: chunked"),
    ],
)
async def test_a_body_with_two_lengths_gets_400_and_the_connection_ends(
    first: bytes, second: bytes
) -> None:
    """RFC 9112 §6.3: such a request may be a smuggling attempt; the request behind it in
    the same write is not answered."""
    async with serving() as port:
        smuggled = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
        received = await exchange(
            port,
            b"POST / HTTP/1.1\r\nHost: x\r\n%s\r\n%s\r\n\r\n0\r\n\r\n%s"
            % (first, second, smuggled),
        )
        assert received.startswith(b"HTTP/1.1 400"), received
        assert b"connection: close" in received.lower()
        assert received.count(b"HTTP/1.1") == 1
        assert b"hello" not in received


async def test_a_chunked_body_alone_is_read_and_the_connection_kept() -> None:
    async with serving() as port:
        received = await exchange(
            port,
            b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        assert b"hello POST 3" in received
        assert b"hello GET 0" in received
