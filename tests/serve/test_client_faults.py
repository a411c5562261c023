"""A frame that breaks RFC 6455 gets the close frame the RFC asks for (§7.1.7) — 1002, or
1007 for text that is not UTF-8 — before the connection ends, on both ports; the libraries
alone only dropped the TCP connection. The verdicts of ``ClientFrames`` are wsproto's own
(the property below compares them with a wsproto server connection over any bytes)."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
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
from wsproto.frame_protocol import FrameProtocol

from tests.serve.test_ws_server import (
    RECEIVE_TIMEOUT_S,
    TRANSPORTS,
    connect,
    running_market,
    until_pong,
)
from tradecanvas.serve.client_frames import ClientFrames, ProtocolViolation, close_frame
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
