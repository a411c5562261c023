"""What an HTTP client can hold of the daemon, on real sockets and a real Hypercorn:
serve_http's send deadline (a client that takes none of an answer is disconnected; a slow
reader is not), and the bound on the API's candle and event reads (``ReadSlots``)."""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio
import trio.testing
from starlette.applications import Starlette
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from tests.serve.test_http_api import RecordingTarget, metric_value
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.serve.http_api import build_http_app
from tradecanvas.serve.http_server import serve_http
from tradecanvas.serve.read_slots import ReadSlots
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.types import StoredCandle

BIG: Final = b"x" * (8 << 20)  # far more than both sides' socket buffers take
SEND_TIMEOUT_S: Final = 30.0
BTC: Final = "binance:futures:BTC/USDT:1m"


class BigAnswer:
    """An ASGI endpoint answering BIG; ``done`` once the answer is written or abandoned."""

    def __init__(self) -> None:
        self.done = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await Response(BIG, media_type="application/octet-stream")(scope, receive, send)
        finally:
            self.done.set()


async def request_big(port: int, *, rcvbuf: int | None) -> trio.SocketStream:
    sock = trio.socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
    return stream


async def read_all(stream: trio.SocketStream, pause: Callable[[], float]) -> int:
    """Bytes read until the server closes (or resets) the connection, pausing ``pause()``
    seconds after every 256 KiB or more."""
    received = since_pause = 0
    while True:
        try:
            chunk = await stream.receive_some(1 << 20)
        except trio.BrokenResourceError:
            return received
        if not chunk:
            return received
        received += len(chunk)
        since_pause += len(chunk)
        if since_pause >= 256 << 10:
            since_pause = 0
            await trio.sleep(pause())


async def serve_big(nursery: trio.Nursery, big: BigAnswer) -> int:
    """serve_http of ``big`` at ``/big`` with the test's send deadline; its port."""
    app = Starlette(routes=[Route("/big", big)])
    port: int = await nursery.start(
        functools.partial(serve_http, app, host="127.0.0.1", port=0, send_timeout_s=SEND_TIMEOUT_S)
    )
    return port


async def test_a_client_that_takes_none_of_an_answer_is_disconnected_after_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    big = BigAnswer()
    async with trio.open_nursery() as nursery:
        port = await serve_big(nursery, big)
        began = trio.current_time()
        stream = await request_big(port, rcvbuf=4096)
        with trio.fail_after(10 * SEND_TIMEOUT_S):
            await big.done.wait()  # nothing read: the write is given up
        waited = trio.current_time() - began
        async with stream:
            assert await read_all(stream, lambda: 0) < len(BIG)  # what was in flight, then EOF
        nursery.cancel_scope.cancel()
    assert SEND_TIMEOUT_S <= waited < 2 * SEND_TIMEOUT_S


async def test_a_client_that_reads_slowly_gets_the_whole_answer(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The deadline is on each 64 KiB of progress, not on the whole answer: 8 MiB read 256
    KiB at a time, two thirds of the deadline apart, take far longer than the deadline."""
    big = BigAnswer()
    async with trio.open_nursery() as nursery:
        port = await serve_big(nursery, big)
        began = trio.current_time()
        async with await request_big(port, rcvbuf=None) as stream:
            with trio.fail_after(1000 * SEND_TIMEOUT_S):
                # until Hypercorn closes the connection, idle after the answer
                received = await read_all(stream, lambda: SEND_TIMEOUT_S * 2 / 3)
        assert big.done.is_set()
        assert received > len(BIG)  # the head and the whole body
        assert trio.current_time() - began > 3 * SEND_TIMEOUT_S
        nursery.cancel_scope.cancel()


class GatedStore:
    """A real SQLite store whose candle reads wait for ``gate``, counting those at once."""

    def __init__(self, inner: CandleStore) -> None:
        self.inner = inner
        self.gate = trio.Event()
        self.running = self.peak = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def window(
        self, series_id: str, since: int | None, before: int | None, limit: int
    ) -> list[StoredCandle]:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await self.gate.wait()
            return await self.inner.window(series_id, since, before, limit)
        finally:
            self.running -= 1


async def until(condition: Callable[[], bool]) -> None:
    while not condition():
        await trio.testing.wait_all_tasks_blocked()


@pytest.mark.parametrize(("slots", "queue"), [(2, 1), (1, 3)])
async def test_candle_reads_beyond_the_slots_wait_and_beyond_the_queue_get_503(
    tmp_path: Path, slots: int, queue: int
) -> None:
    flags = build_runtime_flags(
        {"TRADE_CANVAS_SERIES": BTC, "TRADE_CANVAS_DB_PATH": str(tmp_path / "m.sqlite3")}
    ).flags
    inner = await CandleStore.open(flags.db_path)
    store = GatedStore(inner)
    metrics = Metrics()
    reads = ReadSlots(slots, queue)
    app = build_http_app(
        store=store,
        pipeline=IngestPipeline(
            store, RecordingTarget(), flags.derived_timeframes, flags.derivation_fingerprint()
        ),
        flags=flags,
        metrics=metrics,
        readiness=lambda: {},
        reads=reads,
    )
    statuses: list[int] = []
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(functools.partial(serve_http, app, host="127.0.0.1", port=0))
            limits = httpx.Limits(max_connections=None)
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{port}", limits=limits
            ) as client:

                async def read() -> None:
                    answer = await client.get("/api/market/candles", params={"series_id": BTC})
                    statuses.append(answer.status_code)

                with trio.fail_after(30):
                    async with trio.open_nursery() as readers:
                        for _ in range(slots + queue):
                            readers.start_soon(read)
                        await until(lambda: store.running == slots and reads.waiting == queue)
                        refused = await client.get("/api/market/candles", params={"series_id": BTC})
                        assert refused.status_code == 503
                        assert refused.headers["retry-after"] == "1"
                        assert refused.json()["error"] == "busy"
                        store.gate.set()
                    served = await client.get("/api/market/candles", params={"series_id": BTC})
                    assert served.status_code == 200
                    metrics_text = (await client.get("/metrics")).text
            nursery.cancel_scope.cancel()
    finally:
        await inner.aclose()
    assert statuses == [200] * (slots + queue)
    assert store.peak == slots
    assert metric_value(metrics_text, "tradecanvas_http_refusals", code="busy") == 1
