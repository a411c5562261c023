"""A frame that breaks RFC 6455 gets the close frame the RFC asks for (§7.1.7) — 1002, or
1007 for text that is not UTF-8 — before the connection ends, on both ports; the libraries
alone only dropped the TCP connection. The verdicts of ``ClientFrames`` are wsproto's own
(the property below compares them with a wsproto server connection over any bytes)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import ConnectionTerminated, DataReceived, ResponseReceived, StreamReset
from hypothesis import given
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.connection import Connection, ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    Pong,
    Request,
    TextMessage,
)
from wsproto.extensions import PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

from tests.serve.test_ws_server import (
    RECEIVE_TIMEOUT_S,
    TRANSPORTS,
    connect,
    running_market,
    until_pong,
)
from tradecanvas.serve.client_frames import (
    ClientFrames,
    ProtocolViolation,
    close_frame,
    hypercorn_extensions,
)
from tradecanvas.store.sqlite import CandleStore


def masked(
    first: int, payload: bytes, *, mask: bool = True, key: bytes = b"\x12\x34\x56\x78"
) -> bytes:
    """One frame as a client writes it: ``first`` is the FIN/RSV/opcode byte."""
    if len(payload) < 126:
        head = bytes([first, (0x80 if mask else 0) | len(payload)])
    else:
        head = bytes([first, (0x80 if mask else 0) | 126]) + len(payload).to_bytes(2, "big")
    if not mask:
        return head + payload
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


# frames a careless or hostile client writes: any first byte (FIN, RSV, opcode), masked or
# not, short or long lengths, any payload; beside well-formed frames of every kind
_raw = st.builds(
    masked,
    st.integers(min_value=0, max_value=255),
    st.binary(max_size=140),
    mask=st.booleans(),
    key=st.binary(min_size=4, max_size=4),
)


@st.composite
def _streams(draw: st.DrawFn) -> bytes:
    client = FrameProtocol(client=True, extensions=[])
    parts: list[bytes] = []
    for kind in draw(st.lists(st.sampled_from(["text", "bin", "ping", "pong", "raw"]), max_size=6)):
        if kind == "text":
            parts.append(bytes(client.send_data(draw(st.text(max_size=40)))))
        elif kind == "bin":
            parts.append(bytes(client.send_data(draw(st.binary(max_size=40)))))
        elif kind == "ping":
            parts.append(bytes(client.ping(draw(st.binary(max_size=20)))))
        elif kind == "pong":
            parts.append(bytes(client.pong(draw(st.binary(max_size=20)))))
        else:
            parts.append(draw(_raw))
    return b"".join(parts)


def wsproto_verdict(stream: bytes) -> tuple[int | None, int, list[bytes]]:
    """A wsproto server connection's reading of ``stream``: the close code of the first
    protocol error (None if none before the client's close or the end), and the pings and
    pongs it read before."""
    server = Connection(ConnectionType.SERVER)
    server.receive_data(stream)
    pings, pongs = 0, []
    for event in server.events():
        if isinstance(event, Ping):
            pings += 1
        elif isinstance(event, Pong):
            pongs.append(bytes(event.payload))
        elif isinstance(event, CloseConnection):
            # a close the client sent moves the connection on; one made of a ParseFailed not
            return (event.code if server.state is ConnectionState.OPEN else None), pings, pongs
    return None, pings, pongs


@given(stream=_streams(), cuts=st.lists(st.integers(min_value=0), max_size=8))
def test_the_violations_found_are_wsproto_s_however_the_bytes_arrive(
    stream: bytes, cuts: list[int]
) -> None:
    pongs: list[bytes] = []
    pings: list[None] = []
    frames = ClientFrames(on_pong=pongs.append, on_ping=lambda: pings.append(None))
    found: int | None = None
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    try:
        for start, end in itertools.pairwise(bounds):
            frames.feed(stream[start:end])
    except ProtocolViolation as violation:
        found = violation.code
    assert (found, len(pings), pongs) == wsproto_verdict(stream)


def test_each_kind_of_violation_has_its_code_and_its_reason() -> None:
    cases = [
        (masked(0x81, b"\xff\xfe"), 1007, "utf-8"),
        (masked(0xC1, b"{}"), 1002, "Reserved bit"),
        (masked(0x81, b"{}", mask=False), 1002, "unmasked"),
        (masked(0x83, b"x"), 1002, "opcode"),
        (masked(0x09, b""), 1002, "fragment control"),
        (masked(0x80, b"x"), 1002, "CONTINUATION"),
        (masked(0x88, b"\x03"), 1002, "1 byte"),
    ]
    for stream, code, reason in cases:
        with pytest.raises(ProtocolViolation, match=reason) as raised:
            ClientFrames().feed(stream)
        assert raised.value.code == code
    # after the client's own close nothing more is read, whatever follows it
    frames = ClientFrames()
    frames.feed(masked(0x88, b"\x03\xe8bye") + masked(0x83, b"x"))


def test_a_close_reason_is_cut_between_characters() -> None:
    frame = close_frame(1002, "é" * 100)  # 200 bytes of UTF-8
    payload = frame[2:]
    assert len(payload) <= 125
    assert payload[2:].decode() == "é" * 61


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    s = await CandleStore.open(tmp_path / "market.sqlite3")
    yield s
    await s.aclose()


async def send_raw(port: int, data: bytes) -> list[object]:
    """A raw client (wsproto) that writes ``data`` once the 101 is in, then reads until the
    server ends the connection: the events it read."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = WSConnection(ConnectionType.CLIENT)
    events: list[object] = []
    try:
        await stream.send_all(client.send(Request(host="127.0.0.1", target="/ws/market")))
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            while not any(isinstance(e, AcceptConnection) for e in events):
                client.receive_data(await stream.receive_some(65536))
                events.extend(client.events())
            await stream.send_all(data)
            while True:
                try:
                    received = await stream.receive_some(65536)
                except trio.BrokenResourceError:
                    break
                if not received:
                    break
                client.receive_data(received)
                events.extend(client.events())
    finally:
        await stream.aclose()
    return events


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_broken_frame_gets_its_close_code_and_a_good_client_is_served(
    store: CandleStore, over: str
) -> None:
    async with running_market(store, over=over) as market, connect(market.port) as good:
        for data, code in [
            (masked(0x81, b'{"type": "subscribe"\xff}'), 1007),
            (masked(0xC1, b"{}"), 1002),
            (masked(0x81, b"{}", mask=False), 1002),
        ]:
            events = await send_raw(market.port, data)
            closes = [e for e in events if isinstance(e, CloseConnection)]
            assert [c.code for c in closes] == [code], events
            assert not any(isinstance(e, TextMessage) for e in events)
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            assert await until_pong(good) == []  # nothing subscribed: the pong alone


OFFER: Final = b"permessage-deflate; client_max_window_bits"


def test_a_browser_s_compressed_frames_are_read_as_hypercorn_reads_them() -> None:
    """Browsers offer permessage-deflate, Hypercorn agrees, and every message then comes
    compressed (RSV1 set): read with the extension agreed the way Hypercorn agrees to it,
    such frames are no violation; read without it, the same bytes are."""
    client_side = PerMessageDeflate()
    answer = PerMessageDeflate().accept(OFFER.decode())
    assert isinstance(answer, str)
    client_side.finalize(answer)
    client = FrameProtocol(client=True, extensions=[client_side])
    stream = b"".join(
        [
            bytes(client.send_data('{"type": "ping"}' * 20)),
            bytes(client.ping(b"p")),
            bytes(client.send_data("é" * 300)),
        ]
    )
    assert stream[0] & 0x40  # RSV1: compressed
    pings: list[None] = []
    agreed = hypercorn_extensions([(b"Sec-WebSocket-Extensions", OFFER)])
    ClientFrames(on_ping=lambda: pings.append(None), extensions=agreed).feed(stream)
    assert pings == [None]
    nothing_agreed = hypercorn_extensions([(b"host", b"127.0.0.1")])
    with pytest.raises(ProtocolViolation, match="Reserved bit"):
        ClientFrames(extensions=nothing_agreed).feed(stream)


async def test_a_compressing_client_is_served_on_the_http_port(store: CandleStore) -> None:
    """A client that compresses (as every browser does) over Hypercorn: served, not closed."""
    async with running_market(store, over="http_port") as market:
        stream = await trio.open_tcp_stream("127.0.0.1", market.port)
        client = WSConnection(ConnectionType.CLIENT)
        events: list[object] = []
        request = Request(host="127.0.0.1", target="/ws/market", extensions=[PerMessageDeflate()])
        try:
            await stream.send_all(client.send(request))
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                while not any(isinstance(e, AcceptConnection) for e in events):
                    client.receive_data(await stream.receive_some(65536))
                    events.extend(client.events())
                (accepted,) = [e for e in events if isinstance(e, AcceptConnection)]
                assert [x.name for x in accepted.extensions] == ["permessage-deflate"]
                await stream.send_all(client.send(TextMessage('{"type": "ping"}')))
                texts: list[str] = []
                while not texts:
                    client.receive_data(await stream.receive_some(65536))
                    for event in client.events():
                        assert not isinstance(event, CloseConnection), event
                        if isinstance(event, TextMessage):
                            texts.append(event.data)
            assert '"pong"' in texts[0]
        finally:
            await stream.aclose()


async def test_a_websocket_over_cleartext_http2_is_served(store: CandleStore) -> None:
    """Hypercorn takes WebSockets over HTTP/2 (RFC 8441; a proxy may speak it): the TCP
    connection carries HTTP/2 frames, not WebSocket frames, and is not read as such."""
    async with running_market(store, over="http_port") as market:
        stream = await trio.open_tcp_stream("127.0.0.1", market.port)
        h2 = H2Connection(H2Configuration(client_side=True))
        h2.initiate_connection()
        received = b""
        try:
            await stream.send_all(h2.data_to_send())
            headers = [
                (":method", "CONNECT"),
                (":protocol", "websocket"),
                (":scheme", "http"),
                (":path", "/ws/market"),
                (":authority", f"127.0.0.1:{market.port}"),
                ("sec-websocket-version", "13"),
            ]
            h2.send_headers(1, headers)
            await stream.send_all(h2.data_to_send())
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                while b"pong" not in received:
                    data = await stream.receive_some(65536)
                    assert data, "the connection ended"
                    for event in h2.receive_data(data):
                        assert not isinstance(event, (StreamReset, ConnectionTerminated)), event
                        if isinstance(event, ResponseReceived):  # the data after the 200
                            assert (b":status", b"200") in event.headers
                            h2.send_data(1, masked(0x81, b'{"type": "ping"}'))
                        elif isinstance(event, DataReceived):
                            received += event.data
                            h2.acknowledge_received_data(event.flow_controlled_length, 1)
                    await stream.send_all(h2.data_to_send())
        finally:
            await stream.aclose()


async def test_a_pipelined_second_upgrade_ends_its_connection_not_the_server(
    store: CandleStore,
) -> None:
    """An upgrade refused (403) with a second one right behind it in the same write: h11
    refuses the second answer; that one connection ends and the server serves on."""
    async with running_market(store, over="http_port") as market:
        upgrade = (
            b"GET /ws/market HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\nOrigin: %s\r\n\r\n"
        )
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", market.port)
            try:
                await stream.send_all(
                    upgrade % b"http://evil.example" + upgrade % b"http://127.0.0.1"
                )
                with trio.fail_after(RECEIVE_TIMEOUT_S):
                    answer = await stream.receive_some(65536)
                assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
            finally:
                await stream.aclose()
        async with connect(market.port) as ws:
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                assert await until_pong(ws) == []
