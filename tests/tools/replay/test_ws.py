"""The replay's WebSocket listener: framing, routes, and a socket-level check."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
import trio_websocket
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage

from tests.tools.replay.conftest import STREAM, config_for
from tradecanvas.tools.replay import ReplayError, ReplayHandle, serve_replay
from tradecanvas.tools.replay.server import listen_ports
from tradecanvas.tools.replay.ws import route, ws_text_frame
from tradecanvas.upstream.ws_client import open_websocket_client


@given(st.text(max_size=70_000))
def test_a_text_frame_is_what_a_client_decodes_it_to(text: str) -> None:
    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="x", target="/ws")))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    client.receive_data(ws_text_frame(text))
    parts = list(client.events())
    assert all(isinstance(p, TextMessage) for p in parts)
    assert "".join(p.data for p in parts if isinstance(p, TextMessage)) == text


@pytest.mark.parametrize(
    ("target", "expected"),
    [
        ("/stream?streams=a@kline_1m/b@kline_1m", ({"a@kline_1m", "b@kline_1m"}, False)),
        ("/market/stream?streams=a@kline_1m", ({"a@kline_1m"}, False)),
        ("/stream", (set(), False)),
        ("/ws/a@kline_1m", ({"a@kline_1m"}, True)),
        ("/market/ws", (set(), True)),
        ("/ws/", None),
        ("/fapi/v1/klines", None),
    ],
)
def test_routes(target: str, expected: tuple[set[str], bool] | None) -> None:
    assert route(target) == expected


def test_the_rest_port_is_the_one_above_unless_given(day_csv: Path) -> None:
    assert listen_ports(config_for(day_csv)) == (0, 0)
    assert listen_ports(config_for(day_csv, port=9443)) == (9443, 9444)
    assert listen_ports(config_for(day_csv, port=9443, rest_port=80)) == (9443, 80)
    with pytest.raises(ReplayError, match="must differ"):
        listen_ports(config_for(day_csv, ws_port=9000, rest_port=9000))


async def test_an_unknown_path_is_refused_and_a_ping_answered(day_csv: Path) -> None:
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(
            serve_replay, config_for(day_csv, start_at=1438, paused=True)
        )
        with pytest.raises(trio_websocket.HandshakeError):
            async with open_websocket_client(f"{replay.ws_url}/nowhere"):
                pass
        async with open_websocket_client(f"{replay.ws_url}/ws/{STREAM}") as ws:
            with trio.fail_after(10):
                await ws.ping(b"x")  # returns once the pong came back
        nursery.cancel_scope.cancel()
