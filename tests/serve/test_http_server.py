"""serve_http's own accept loop around Hypercorn: each connection reachable from its ASGI
scope, and a drain that stays bounded when peers stop reading (Hypercorn's writes are
shielded from cancellation, so only aborting the connection ends them).

The HTTP API's drain of requests in flight is tested in tests/serve/test_http_api.py.
"""

from __future__ import annotations

import functools
import itertools
import socket
from typing import Final

import httpx
import trio
import trio_websocket
from hypothesis import given
from hypothesis import strategies as st
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket
from wsproto.frame_protocol import FrameProtocol

from tests.serve.http_rig import StoppableServer
from tradecanvas.serve.client_frames import ClientFrames
from tradecanvas.serve.http_server import serve_http, served_connection

BIG: Final = b"x" * (8 << 20)  # far more than both sides' socket buffers take


def app_with_stuck_writers(answering: trio.Event, flooding: trio.Event) -> Starlette:
    async def big(request: Request) -> Response:
        answering.set()
        return Response(BIG, media_type="application/octet-stream")

    async def flood(websocket: WebSocket) -> None:
        await websocket.accept()
        flooding.set()
        # not `while True`: once Hypercorn has closed a WebSocket its send returns at once,
        # without a checkpoint, and such a loop would never yield
        for start in range(0, len(BIG), 1 << 20):
            await websocket.send_bytes(BIG[start : start + (1 << 20)])

    async def connection(request: Request) -> Response:
        return JSONResponse({"served": served_connection(request.scope) is not None})

    return Starlette(
        routes=[
            Route("/big", big),
            Route("/connection", connection),
            WebSocketRoute("/flood", flood),
        ]
    )


async def never_reading(port: int) -> trio.SocketStream:
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def test_each_connection_is_reachable_from_its_scope() -> None:
    async with trio.open_nursery() as nursery:
        app = app_with_stuck_writers(trio.Event(), trio.Event())
        port = await nursery.start(functools.partial(serve_http, app, host="127.0.0.1", port=0))
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/connection")).json() == {"served": True}
        nursery.cancel_scope.cancel()
    assert served_connection({"type": "http", "state": {}}) is None
    assert served_connection({"type": "http"}) is None


async def test_the_drain_aborts_connections_whose_writes_never_finish() -> None:
    """A WebSocket flooding a peer that does not read, and an answer its client never reads:
    Hypercorn's shielded writes would hold the server for as long as the peers live."""
    drain_s = 0.3
    answering, flooding = trio.Event(), trio.Event()
    server = StoppableServer(app_with_stuck_writers(answering, flooding), drain_s)
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(server.run)
        http_peer = await never_reading(port)
        await http_peer.send_all(b"GET /big HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        ws_peer = await never_reading(port)
        async with trio.open_nursery() as client:
            await trio_websocket.wrap_client_stream(client, ws_peer, "127.0.0.1", "/flood")
            client.cancel_scope.cancel()  # nobody reads from here on
        with trio.fail_after(10):
            await answering.wait()
            await flooding.wait()
        began = trio.current_time()
        server.scope.cancel()
        with trio.fail_after(drain_s + 5):
            await server.done.wait()
        elapsed = trio.current_time() - began
        for stream in (http_peer, ws_peer):
            await stream.aclose()
    assert drain_s * 0.9 <= elapsed < drain_s + 1.0


# a client's frames, as wsproto's client side writes them (masked): ("text", …), ("binary",
# …) up to 64 KiB + 1 (every length encoding), ("ping", …) and ("pong", …) up to 125 bytes
_frames = st.lists(
    st.one_of(
        st.tuples(st.just("text"), st.text(max_size=300)),
        st.tuples(st.just("binary"), st.sampled_from([0, 125, 126, 65535, 65536 + 1])),
        st.tuples(st.sampled_from(["ping", "pong"]), st.binary(max_size=125)),
    ),
    max_size=8,
)


@given(frames=_frames, cuts=st.lists(st.integers(min_value=0), max_size=12))
def test_the_pongs_and_pings_of_a_client_are_found_however_its_bytes_arrive(
    frames: list[tuple[str, object]], cuts: list[int]
) -> None:
    client = FrameProtocol(client=True, extensions=[])
    stream = b""
    pongs: list[bytes] = []
    pings = 0
    for kind, value in frames:
        if kind == "text":
            assert isinstance(value, str)
            stream += client.send_data(value)
        elif kind == "binary":
            assert isinstance(value, int)
            stream += client.send_data(b"b" * value)
        elif kind == "ping":
            assert isinstance(value, bytes)
            stream += client.ping(value)
            pings += 1
        else:
            assert isinstance(value, bytes)
            stream += client.pong(value)
            pongs.append(value)
    found: list[bytes] = []
    pinged: list[None] = []
    scanner = ClientFrames(on_pong=found.append, on_ping=lambda: pinged.append(None))
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    for start, end in itertools.pairwise(bounds):
        scanner.feed(stream[start:end])
    assert found == pongs
    assert len(pinged) == pings
