"""/ws/market on the HTTP port, where Hypercorn differs from trio-websocket: the writer task
that makes sends cancellable without tearing a frame, the peer's close code Hypercorn does
not pass on, a close that cannot get out dropping the connection.

What both ports share (every message type, refusals, 1009, 1008, 1001, 4008, resuming) is
tested over both in tests/serve/test_ws_session.py and tests/serve/test_hub.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast, final

import pytest
import trio
import trio.testing
import trio_websocket
from starlette.types import Message
from starlette.websockets import WebSocket

from tests.conftest import flat_minutes
from tests.serve.test_ws_server import (
    RECEIVE_TIMEOUT_S,
    SID_1M,
    close_code_of,
    connect,
    running_market,
    send,
    subscribe_msg,
    until_pong,
)
from tradecanvas.serve import ws_session
from tradecanvas.serve.http_server import ServedConnection
from tradecanvas.serve.subscriber import TransportClosed
from tradecanvas.serve.ws_asgi import AsgiTransport
from tradecanvas.store.sqlite import CandleStore

T0 = 1751760000


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    yield opened
    await opened.aclose()


@final
class GatedWebSocket:
    """Stands in for a Starlette WebSocket under Hypercorn: ``send`` waits, uncancellably
    (Hypercorn shields its socket writes), until the test lets the frame out."""

    client = None  # Starlette's peer address, unknown here

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.gate = trio.Event()
        self.inbox_in, self.inbox_out = trio.open_memory_channel[Message](10)
        self.fail_with: Exception | None = None

    async def send(self, message: Message) -> None:
        with trio.CancelScope(shield=True):
            await self.gate.wait()
        if self.fail_with is not None:
            raise self.fail_with
        self.sent.append(message)

    async def receive(self) -> Message:
        return await self.inbox_out.receive()


@asynccontextmanager
async def writing(fake: GatedWebSocket) -> AsyncIterator[AsgiTransport]:
    """A transport over ``fake`` with its writer task running (cancelled on the way out)."""
    transport = AsgiTransport(cast("WebSocket", fake), None)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(transport.write_frames)
        yield transport
        nursery.cancel_scope.cancel()


def texts(fake: GatedWebSocket) -> list[Any]:
    return [m.get("text", m["type"]) for m in fake.sent]


async def test_a_cancelled_send_finishes_its_frame_and_keeps_the_order(
    autojump_clock: trio.testing.MockClock,
) -> None:
    fake = GatedWebSocket()
    async with writing(fake) as transport:
        with trio.move_on_after(1) as timed_out:  # the Hub's send timeout
            await transport.send_message("a")
        assert timed_out.cancelled_caught and fake.sent == []  # "a" is in flight
        with trio.move_on_after(1):  # handed over only once "a" is out: never begun
            await transport.send_message("b")
        fake.gate.set()
        await transport.send_message("c")
        assert texts(fake) == ["a", "c"]


async def test_the_peer_leaving_ends_reads_and_drops_later_sends() -> None:
    fake = GatedWebSocket()
    fake.gate.set()
    async with writing(fake) as transport:
        await fake.inbox_in.send({"type": "websocket.receive", "text": '{"type":"ping"}'})
        await fake.inbox_in.send({"type": "websocket.receive", "bytes": b"{}"})
        # Hypercorn says 1006 for any close by the peer: a close without a known code
        await fake.inbox_in.send({"type": "websocket.disconnect", "code": 1006})
        assert await transport.get_message() == '{"type":"ping"}'
        assert await transport.get_message() == b"{}"
        with pytest.raises(TransportClosed) as closed:
            await transport.get_message()
        assert closed.value.code == 1005
        await transport.send_message("dropped")
        await transport.aclose(1000, None)  # nothing left to close
        assert fake.sent == []


async def test_close_sends_the_frame_and_waits_for_the_peer() -> None:
    fake = GatedWebSocket()
    fake.gate.set()
    async with writing(fake) as transport:
        await fake.inbox_in.send({"type": "websocket.receive", "text": "late"})
        await fake.inbox_in.send({"type": "websocket.disconnect", "code": 1000})
        await transport.aclose(4008, "slow consumer")
        assert fake.sent == [{"type": "websocket.close", "code": 4008, "reason": "slow consumer"}]
        await transport.send_message("after the close")
        assert len(fake.sent) == 1


async def test_a_refused_write_is_a_delivery_failure() -> None:
    fake = GatedWebSocket()
    fake.gate.set()
    fake.fail_with = RuntimeError('Cannot call "send" once a close message has been sent.')
    async with writing(fake) as transport:
        with pytest.raises(TransportClosed) as closed:
            await transport.send_message("x")
        assert closed.value.code is None and "RuntimeError" in (closed.value.reason or "")
        with pytest.raises(TransportClosed):
            await transport.send_message("y")
        await transport.aclose(1000, None)  # does not try again


# --- with real sockets ------------------------------------------------------------------


async def test_a_peer_gone_without_a_close_counts_as_a_goodbye(store: CandleStore) -> None:
    """Hypercorn cannot tell a lost connection from a clean close (both 1006): on the HTTP
    port both are counted as client_closed, and neither fails a publish."""
    async with running_market(store, over="http_port") as market:
        stream = await trio.open_tcp_stream("127.0.0.1", market.port)
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/ws/market")
            await send(ws, subscribe_msg(SID_1M))
            await until_pong(ws)
            nursery.cancel_scope.cancel()
        await stream.aclose()  # no close frame: the TCP connection just ends
        await market.hub.wait_subscribers(0)
        minute = list(flat_minutes(T0, 1))
        await store.upsert(SID_1M, minute, "ws")
        assert market.hub.publish_closed(SID_1M, minute) == []
        text = market.metrics.render().decode()
        assert 'tradecanvas_subscriber_disconnects_total{reason="client_closed"} 1.0' in text


async def test_a_close_that_is_not_answered_drops_the_connection_and_still_arrives(
    store: CandleStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A peer that never reads: its send times out (4008) and its close frame goes into the
    socket behind what is in flight (the in-flight budget and the lifted TCP_NOTSENT_LOWAT:
    tradecanvas.serve.in_flight). It does not answer the close, so when the close deadline
    passes the connection is aborted — the session does not wait on the peer for ever — and
    the kernel still delivers the close frame when the client reads at last."""
    monkeypatch.setattr(ws_session, "CLOSE_TIMEOUT_S", 0.3)
    aborted = trio.Event()
    abort = ServedConnection.abort

    def spy(connection: ServedConnection) -> None:
        abort(connection)
        aborted.set()

    monkeypatch.setattr(ServedConnection, "abort", spy)
    minutes = list(flat_minutes(T0, 20_000, price="108123.45"))  # ~2 MB of catch-up
    await store.upsert(SID_1M, minutes, "ws")
    async with (
        running_market(store, send_timeout_s=0.2, catchup_limit=100, over="http_port") as market,
        connect(market.port, receive_buffer=4096, message_queue_size=1) as stalled,
    ):
        await send(stalled, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        await market.hub.wait_subscribers(1)
        (subscriber,) = market.hub.subscribers()
        await market.hub.wait_subscribers(0)
        assert subscriber.close_code == 4008
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            await aborted.wait()
        # the connection is gone from under the stalled client; what was written arrives
        assert await close_code_of(stalled) == 4008
