"""Admission to /ws/market: ``TRADE_CANVAS_MAX_CONNECTIONS`` holds exactly under concurrent
handshakes on both ports, and every slot comes back (clients leaving, handshakes aborted,
failed or cancelled); the WS port caps the connections still in their handshake, sheds the
rest at accept, and recovers.

Raw upgrade requests on real sockets (127.0.0.1, port 0) against the real endpoint, so that
many handshakes are in flight at the same moment; the handshake timeout under the autojump
clock.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Final, NoReturn

import pytest
import starlette.websockets
import trio
import trio.testing
import trio_websocket

from tests.serve.test_ws_server import (
    RECEIVE_TIMEOUT_S,
    TRANSPORTS,
    Market,
    connect,
    handshake_rejection,
    running_market,
    until_pong,
)
from tradecanvas.serve.ws_server import HANDSHAKE_TIMEOUT_S
from tradecanvas.store.sqlite import CandleStore

REQUEST_LINE: Final = b"GET /ws/market HTTP/1.1\r\n"
HEADERS: Final = (
    b"Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
UPGRADE: Final = REQUEST_LINE + HEADERS


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    yield opened
    await opened.aclose()


async def until(condition: Callable[[], bool]) -> None:
    """Until ``condition`` holds, looking again whenever every task is blocked (bounded)."""
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        while not condition():
            await trio.testing.wait_all_tasks_blocked()


def sample(market: Market, name: str, **labels: str) -> float:
    value = market.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def admitted(market: Market) -> int:
    return market.endpoint.admitted


def pending(market: Market) -> float:
    return sample(market, "tradecanvas_ws_handshakes_pending")


def shed(market: Market) -> float:
    return sample(market, "tradecanvas_ws_handshakes_shed_total")


@asynccontextmanager
async def raw_streams(port: int, count: int) -> AsyncIterator[list[trio.SocketStream]]:
    """``count`` TCP connections to ``port``, all closed on the way out."""
    streams: list[trio.SocketStream] = []
    try:
        for _ in range(count):
            streams.append(await trio.open_tcp_stream("127.0.0.1", port))
        yield streams
    finally:
        for stream in streams:
            await stream.aclose()


async def status_of(stream: trio.SocketStream, within: float = RECEIVE_TIMEOUT_S) -> int | None:
    """The HTTP status the server answered on ``stream``; None: closed without an answer."""
    data = b""
    with trio.fail_after(within):
        while b"\r\n" not in data:
            try:
                chunk = await stream.receive_some(4096)
            except trio.BrokenResourceError:  # reset
                return None
            if not chunk:
                return None
            data += chunk
    return int(data.split(b" ", 2)[1])


async def closed_unanswered(port: int) -> bool:
    """Whether a connection to ``port`` is closed without an answer (reset so soon that the
    connect may see it already)."""
    sock = trio.socket.socket()
    stream = trio.SocketStream(sock)
    try:
        try:
            await sock.connect(("127.0.0.1", port))
        except ConnectionResetError:
            return True
        try:
            await stream.send_all(UPGRADE)
        except trio.BrokenResourceError:
            return True
        return await status_of(stream) is None
    finally:
        await stream.aclose()


def reset(stream: trio.SocketStream) -> None:
    """Drop the connection at once (RST), as a client that vanishes does."""
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    stream.socket.close()


# --- the connection limit ---------------------------------------------------------------


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_concurrent_handshakes_admit_exactly_the_limit(store: CandleStore, over: str) -> None:
    limit, tries = 8, 60
    async with running_market(store, over=over, max_connections=limit) as market:
        async with raw_streams(market.port, tries) as streams:
            for stream in streams:  # every request is in before any is answered
                await stream.send_all(UPGRADE)
            statuses = [await status_of(stream) for stream in streams]
            assert (statuses.count(101), statuses.count(503)) == (limit, tries - limit)
            assert sample(market, "tradecanvas_ws_refusals_total", reason="max_connections") == (
                tries - limit
            )
            await market.hub.wait_subscribers(limit)
            assert admitted(market) == limit
        # the clients left: every slot is back, and a new wave gets exactly as many
        await market.hub.wait_subscribers(0)
        await until(lambda: admitted(market) == 0)
        async with raw_streams(market.port, limit + 1) as streams:
            for stream in streams:
                await stream.send_all(UPGRADE)
            statuses = [await status_of(stream) for stream in streams]
            assert sorted(statuses, key=str) == [101] * limit + [503]


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_clients_vanishing_mid_handshake_leave_no_slot_taken(
    store: CandleStore, over: str, caplog: pytest.LogCaptureFixture
) -> None:
    limit = 2
    async with running_market(store, over=over, max_connections=limit) as market:
        for _ in range(3):  # more than the limit, several times over
            async with raw_streams(market.port, 4 * limit) as streams:
                for stream in streams:
                    await stream.send_all(UPGRADE)
                for stream in streams:
                    reset(stream)  # before reading the answer, maybe before it is written
            await until(lambda: admitted(market) == 0 and not market.hub.subscribers())
        async with connect(market.port) as first, connect(market.port) as second:
            await until_pong(first)
            await until_pong(second)
            assert (await handshake_rejection(market.port, "/ws/market")).status_code == 503
    # a client gone mid-handshake is no error of the daemon's: nothing logged above DEBUG
    # (the store fixture's own "created a new, empty store" is the store's, not the port's)
    logged = [
        r for r in caplog.records if r.levelno >= logging.INFO and not r.name.endswith(".sqlite")
    ]
    assert logged == [], [r.getMessage() for r in logged]


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_failing_accept_gives_its_slot_back(
    store: CandleStore, over: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def failing_accept(*args: object, **kwargs: object) -> NoReturn:
        await trio.lowlevel.checkpoint()
        raise RuntimeError("the accept failed")

    target = (
        trio_websocket.WebSocketRequest if over == "ws_port" else starlette.websockets.WebSocket
    )
    async with running_market(store, over=over, max_connections=1) as market:
        with monkeypatch.context() as patch:
            patch.setattr(target, "accept", failing_accept)
            for _ in range(3):
                async with raw_streams(market.port, 1) as (stream,):
                    await stream.send_all(UPGRADE)
                    assert await status_of(stream) != 101
                await until(lambda: admitted(market) == 0)
        async with connect(market.port) as ws:
            await until_pong(ws)
            assert admitted(market) == 1


async def test_an_accept_cut_by_the_handshake_timeout_gives_its_slot_back(
    store: CandleStore, monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    async def stuck_accept(*args: object, **kwargs: object) -> NoReturn:
        await trio.sleep_forever()

    async with running_market(store, max_connections=1) as market:
        with monkeypatch.context() as patch:
            patch.setattr(trio_websocket.WebSocketRequest, "accept", stuck_accept)
            async with raw_streams(market.port, 1) as (stream,):
                await stream.send_all(UPGRADE)
                await until(lambda: admitted(market) == 1)
                started = trio.current_time()
                # closed by the handshake timeout
                assert await status_of(stream, within=2 * HANDSHAKE_TIMEOUT_S) is None
                assert trio.current_time() - started == pytest.approx(HANDSHAKE_TIMEOUT_S, abs=0.1)
            await until(lambda: admitted(market) == 0)
        async with connect(market.port) as ws:
            await until_pong(ws)


# --- handshakes pending on the WS port --------------------------------------------------


async def test_handshakes_beyond_the_pending_cap_are_shed_at_accept_and_it_recovers(
    store: CandleStore, autojump_clock: trio.testing.MockClock
) -> None:
    cap = 4
    async with (
        running_market(store, max_pending_handshakes=cap) as market,
        raw_streams(market.port, cap) as lingering,
    ):
        for stream in lingering:  # a request line, and then nothing
            await stream.send_all(REQUEST_LINE)
        await until(lambda: pending(market) == cap)
        for _ in range(3):
            assert await closed_unanswered(market.port)
        assert (shed(market), pending(market)) == (3, cap)

        # one lingering client finishes its request: upgraded, no longer pending
        await lingering[0].send_all(HEADERS)
        assert await status_of(lingering[0]) == 101
        await until(lambda: pending(market) == cap - 1)
        async with connect(market.port) as ws:  # room for one more handshake
            await until_pong(ws)
            assert shed(market) == 3

            # the others are closed by the handshake timeout; every place is free again
            started = trio.current_time()
            for stream in lingering[1:]:
                assert await status_of(stream, within=2 * HANDSHAKE_TIMEOUT_S) is None
            assert trio.current_time() - started <= HANDSHAKE_TIMEOUT_S
            await until(lambda: pending(market) == 0)
            async with raw_streams(market.port, cap) as streams:
                for stream in streams:
                    await stream.send_all(UPGRADE)
                assert [await status_of(stream) for stream in streams] == [101] * cap
            assert shed(market) == 3


@pytest.mark.parametrize("sent", [b"", REQUEST_LINE], ids=["nothing", "a request line"])
async def test_a_client_gone_during_its_handshake_frees_its_place_at_once(
    store: CandleStore, autojump_clock: trio.testing.MockClock, sent: bytes
) -> None:
    async with running_market(store, max_pending_handshakes=1) as market:
        async with raw_streams(market.port, 1) as (gone,):
            await gone.send_all(sent)
            await until(lambda: pending(market) == 1)
        # the end of its input, not the handshake timeout, frees the place (virtual time:
        # the clock moves only once every task waits)
        await trio.sleep(HANDSHAKE_TIMEOUT_S / 10)
        assert pending(market) == 0
        async with connect(market.port) as ws:
            await until_pong(ws)
        assert shed(market) == 0


async def test_a_client_that_half_closes_after_its_whole_request_is_answered(
    store: CandleStore,
) -> None:
    async with running_market(store) as market, raw_streams(market.port, 1) as (stream,):
        await stream.send_all(UPGRADE)
        await stream.send_eof()  # nothing more to say, as `nc -N` does
        assert await status_of(stream) == 101
