"""A frame that breaks RFC 6455 gets the close frame the RFC asks for (§7.1.7) — 1002, or
1007 for text that is not UTF-8 — before the connection ends, on both ports; the libraries
alone only dropped the TCP connection. The verdicts of ``ClientFrames`` are wsproto's own
(the property below compares them with a wsproto server connection over any bytes)."""

from __future__ import annotations

import contextlib
import itertools
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Final

import pytest
import trio
from hypothesis import HealthCheck, given, settings
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
from wsproto.extensions import Extension, PerMessageDeflate
from wsproto.frame_protocol import FrameProtocol

from tests.serve.test_http_api import metric_value
from tests.serve.test_ws_server import (
    RECEIVE_TIMEOUT_S,
    TRANSPORTS,
    Market,
    connect,
    running_market,
    until_pong,
)
from tradecanvas.serve.client_frames import (
    MAX_READ_MESSAGE_BYTES,
    ClientFrames,
    MessageTooBig,
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
    elif len(payload) < 1 << 16:
        head = bytes([first, (0x80 if mask else 0) | 126]) + len(payload).to_bytes(2, "big")
    else:
        head = bytes([first, (0x80 if mask else 0) | 127]) + len(payload).to_bytes(8, "big")
    if not mask:
        return head + payload
    keys = key * (len(payload) // 4 + 1)
    return (
        head
        + key
        + (int.from_bytes(payload) ^ int.from_bytes(keys[: len(payload)])).to_bytes(len(payload))
    )


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


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # a loaded machine
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


async def send_raw(port: int, data: bytes, extensions: Sequence[Extension] = ()) -> list[object]:
    """A raw client (wsproto, offering ``extensions``) that writes ``data`` once the 101 is
    in while it reads until the server ends the connection: the events it read. What the
    server refuses of ``data`` (it ended the connection) is not an error."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    client = WSConnection(ConnectionType.CLIENT)
    events: list[object] = []
    request = Request(host="127.0.0.1", target="/ws/market", extensions=list(extensions))

    async def write() -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            await stream.send_all(data)

    try:
        await stream.send_all(client.send(request))
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            while not any(isinstance(e, AcceptConnection) for e in events):
                client.receive_data(await stream.receive_some(65536))
                events.extend(client.events())
            async with trio.open_nursery() as nursery:
                nursery.start_soon(write)
                while True:
                    try:
                        received = await stream.receive_some(65536)
                    except trio.BrokenResourceError:
                        break
                    if not received:
                        break
                    client.receive_data(received)
                    events.extend(client.events())
                nursery.cancel_scope.cancel()
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


# offers a client may make: each one agreed to as Hypercorn agrees (None: no extension)
_OFFERS: Final = (
    None,
    "permessage-deflate",
    "permessage-deflate; client_max_window_bits",
    "permessage-deflate; client_max_window_bits=10",
    "permessage-deflate; client_no_context_takeover",
)
# a small limit, so that the property reaches past it often
_LIMIT: Final = 1000


def agreed_client(offer: str | None) -> tuple[FrameProtocol, list[Extension]]:
    """A client's frame writer after a handshake offering ``offer``, and the extensions the
    server agreed to (what ClientFrames is given)."""
    if offer is None:
        return FrameProtocol(client=True, extensions=[]), []
    answer = PerMessageDeflate().accept(offer)
    assert isinstance(answer, str)
    client_side = PerMessageDeflate()
    # the response header's value, the extension's name first (accept() gives the rest)
    client_side.finalize(f"{client_side.name}; {answer}")
    agreed = hypercorn_extensions([(b"sec-websocket-extensions", offer.encode())])
    return FrameProtocol(client=True, extensions=[client_side]), agreed


# messages of any size up to a few times the limit, compressible or not, text or binary
_messages = st.one_of(
    st.builds(lambda unit, n: unit * n, st.text(min_size=1, max_size=8), st.integers(0, 700)),
    st.text(max_size=1500),
    st.binary(max_size=1500),
)


@given(
    offer=st.sampled_from(_OFFERS),
    messages=st.lists(st.tuples(_messages, st.integers(1, 3), st.booleans()), max_size=5),
    cuts=st.lists(st.integers(min_value=0), max_size=8),
)
def test_a_message_over_the_limit_is_refused_whether_compressed_or_not(
    offer: str | None, messages: list[tuple[str | bytes, int, bool]], cuts: list[int]
) -> None:
    """Each message counts its bytes (inflated, if compressed), in however many frames and
    however the bytes arrive: within the limit it is read like any other, past it the read
    ends with 1009 there (the pings before it counted, none after)."""
    client, agreed = agreed_client(offer)
    parts: list[bytes] = []
    over_at: int | None = None  # the pings sent before the first message over the limit
    pings = 0
    for message, pieces, then_ping in messages:
        size = len(message.encode() if isinstance(message, str) else message)
        if over_at is None and size > _LIMIT:
            over_at = pings
        step = len(message) // pieces + 1
        for start in range(0, len(message) or 1, step):
            end = start + step
            parts.append(bytes(client.send_data(message[start:end], fin=end >= len(message))))
        if then_ping:
            parts.append(bytes(client.ping(b"p")))
            pings += 1
    stream = b"".join(parts)
    counted: list[None] = []
    frames = ClientFrames(
        on_ping=lambda: counted.append(None), extensions=agreed, max_message_bytes=_LIMIT
    )
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    code: int | None = None
    try:
        for start, end in itertools.pairwise(bounds):
            frames.feed(stream[start:end])
    except MessageTooBig as fault:
        code = fault.code
    assert code == (None if over_at is None else 1009)
    assert len(counted) == (pings if over_at is None else over_at)


def deflate_bomb(inflated: int) -> bytes:
    """A permessage-deflate text message's payload inflating to ``inflated`` bytes and
    more (about a thousandth of that on the wire)."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [deflate.compress(b'{"type": "ping", "pad": "')]
    block = b"x" * (1 << 20)
    parts.extend(deflate.compress(block) for _ in range(inflated >> 20))
    parts.append(deflate.compress(b'"}') + deflate.flush(zlib.Z_SYNC_FLUSH))
    return b"".join(parts)[: -len(b"\x00\x00\xff\xff")]


BOMB_BYTES: Final = 32 << 20  # inflated; 32 KiB on the wire
# what reading a bomb or an oversized message may take in memory, all told: a few times the
# limit (the libraries' buffers, one read of 64 KiB); reading it all took far more than this
READ_BOUND_BYTES: Final = 8 << 20


def feed_in_reads(frames: ClientFrames, wire: bytes) -> None:
    """Feed ``wire`` as a server reads it: 64 KiB at a time."""
    for start in range(0, len(wire), 1 << 16):
        frames.feed(wire[start : start + (1 << 16)])


def test_a_deflate_bomb_is_refused_without_being_inflated() -> None:
    wire = masked(0xC1, deflate_bomb(BOMB_BYTES))
    assert len(wire) < BOMB_BYTES // 500
    frames = ClientFrames(extensions=hypercorn_extensions([(b"sec-websocket-extensions", OFFER)]))
    tracemalloc.start()
    try:
        with pytest.raises(MessageTooBig, match="message too big"):
            feed_in_reads(frames, wire)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * MAX_READ_MESSAGE_BYTES


async def read_with_memory(port: int, wire: bytes, *offered: Extension) -> tuple[list[object], int]:
    """:func:`send_raw`, and the most memory (traced, this process: the server's too) it
    took beyond what was in use before."""
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        events = await send_raw(port, wire, offered)
        return events, tracemalloc.get_traced_memory()[1] - before
    finally:
        tracemalloc.stop()


async def until_counted(market: Market, reason: str, count: float) -> None:
    with trio.fail_after(RECEIVE_TIMEOUT_S):
        while True:
            text = market.metrics.render().decode()
            if metric_value(text, "tradecanvas_subscriber_disconnects", reason=reason) == count:
                return
            await trio.sleep(0.01)


async def test_a_deflate_bomb_is_closed_with_1009_before_it_is_inflated(
    store: CandleStore,
) -> None:
    """A browser-like client (permessage-deflate, agreed on the HTTP port) sends a message of
    32 KiB that inflates to 32 MiB: closed with 1009, counted as a message too big, and the
    daemon's memory never holds more than a few times the limit (Hypercorn and the frame
    check each inflated all of it, and Hypercorn read on after its own 1009)."""
    async with running_market(store, over="http_port") as market:
        wire = masked(0xC1, deflate_bomb(BOMB_BYTES))
        events, grown = await read_with_memory(market.port, wire * 2, PerMessageDeflate())
        closes = [e for e in events if isinstance(e, CloseConnection)]
        assert [(c.code, c.reason) for c in closes] == [(1009, "message too big")], events
        assert grown < READ_BOUND_BYTES
        await until_counted(market, "message_too_big", 1)
        async with connect(market.port) as good:
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                assert await until_pong(good) == []


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_message_far_over_the_limit_is_not_read_on(store: CandleStore, over: str) -> None:
    """16 MiB in one text frame: the connection is closed with 1009 and ends after the
    first few hundred KiB; the rest is not read (Hypercorn read all of it)."""
    async with running_market(store, over=over) as market:
        wire = masked(0x81, b"x" * (16 << 20))
        events, grown = await read_with_memory(market.port, wire)
        closes = [e for e in events if isinstance(e, CloseConnection)]
        assert [c.code for c in closes] == [1009], events
        assert grown < READ_BOUND_BYTES
