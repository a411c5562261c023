"""A client that half-closes (shutdown(SHUT_WR)) before its request body is complete, on
serve_http's real Hypercorn: it gets the app's whole answer, nothing is logged, and the
server goes on serving. Hypercorn takes such an end of input for the connection's end and
used to close it from its reading task (``send_eof``) while the app's answer was being
written: the answer cut short, and trio's ``BusyResourceError`` logged as an ASGI error."""

from __future__ import annotations

import functools
import logging
from typing import Final

import httpx
import pytest
import trio
import trio.testing
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from tradecanvas.serve.http_server import serve_http

BIG: Final = b"y" * (8 << 20)  # far more than both sides' socket buffers take
SMALL: Final = b"z" * 300


def app() -> Starlette:
    async def big(request: Request) -> Response:  # answers without reading the body
        return Response(BIG, status_code=422)

    async def small(request: Request) -> Response:
        return Response(SMALL, status_code=422)

    async def awaiting(request: Request) -> Response:
        # answers after an await (as the API's store reads), once the server has read the
        # end of input and every task waits
        await trio.testing.wait_all_tasks_blocked()
        return Response(SMALL, status_code=422)

    async def echo(request: Request) -> Response:  # reads the body first
        try:
            return Response(await request.body())
        except ClientDisconnect:  # as the API's read_body_limited does
            return Response(status_code=400)

    return Starlette(
        routes=[
            Route("/big", big, methods=["GET", "POST"]),
            Route("/small", small, methods=["GET", "POST"]),
            Route("/awaiting", awaiting, methods=["GET"]),
            Route("/echo", echo, methods=["POST"]),
        ]
    )


async def half_closed(port: int, method: str, path: str) -> bytes:
    """Everything the server sends back to a request whose body stops after 1 of 100 bytes
    and whose client then ends its output."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nx".encode()
        )
        await stream.send_eof()
        received = bytearray()
        while chunk := await stream.receive_some():
            received += chunk
    return bytes(received)


def split(answer: bytes) -> tuple[str, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), body


async def test_a_half_closed_request_gets_the_whole_answer_and_nothing_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(serve_http, app(), host="127.0.0.1", port=0))
        with trio.fail_after(30):
            # the answer is still being written when the server reads the end of input
            assert split(await half_closed(port, "GET", "/big")) == ("HTTP/1.1 422 ", BIG)
            for _ in range(10):
                for method in ("GET", "POST"):
                    answer = await half_closed(port, method, "/small")
                    assert split(answer) == ("HTTP/1.1 422 ", SMALL)
                answer = await half_closed(port, "GET", "/awaiting")
                assert split(answer) == ("HTTP/1.1 422 ", SMALL)
            # an app waiting for the rest of the body: Hypercorn's own 400
            status, body = split(await half_closed(port, "POST", "/echo"))
            assert (status, body) == ("HTTP/1.1 400 ", b"")
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                served = await client.post("/echo", content=b"still serving")
            assert (served.status_code, served.content) == (200, b"still serving")
        nursery.cancel_scope.cancel()
    logged = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert logged == [], [r.getMessage() for r in logged]
