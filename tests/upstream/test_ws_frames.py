"""FastTextFrames: wsproto with a fast path for small text frames gives what wsproto alone
gives, for every frame kind and every way the bytes are split into reads (over a real
socket: tests/upstream/test_ws_client.py)."""

from __future__ import annotations

import itertools
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Ping,
    Pong,
    RejectConnection,
    RejectData,
    Request,
    TextMessage,
)

from tradecanvas.upstream.ws_frames import FastTextFrames

HANDSHAKE_HOST = "example.test"


def frame(opcode: int, payload: bytes, *, fin: bool = True, rsv: int = 0, mask: bool = False,
          long_form: int | None = None) -> bytes:  # fmt: skip
    """One frame's bytes; ``long_form`` 126 or 127 writes the length in that form even
    when a shorter one would do (which wsproto refuses)."""
    first = (0x80 if fin else 0) | rsv << 4 | opcode
    size = len(payload)
    form = long_form or (size if size < 126 else 126 if size < 1 << 16 else 127)
    head = bytes((first, form | (0x80 if mask else 0)))
    if form == 126:
        head += struct.pack("!H", size)
    elif form == 127:
        head += struct.pack("!Q", size)
    if mask:
        key = b"\x01\x02\x03\x04"
        head += key
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return head + payload


def text(s: str) -> bytes:
    return frame(1, s.encode())


# frames a server may send, well-formed or not
GOOD = {
    "text": text('{"stream":"btcusdt@kline_1m","data":{}}'),
    "empty": text(""),
    "unicode": text("prix: 37 000 € ✓"),
    "text_16bit": text("x" * 300),
    "text_16bit_max": text("y" * 0xFFFF),
    "text_64bit": text("z" * 0x10000),
    "binary": frame(2, b"\x00\x01\x02"),
    "ping": frame(9, b"are you there"),
    "pong": frame(10, b"yes"),
    "fragmented": frame(1, b"first ", fin=False) + frame(0, b"middle ", fin=False)
    + frame(9, b"ping between") + frame(0, b"last"),
}  # fmt: skip
BAD = {
    "masked": frame(1, b"masked", mask=True),
    "non_minimal_16": frame(1, b"short", long_form=126),
    "non_minimal_64": frame(1, b"x" * 200, long_form=127),
    "rsv1": frame(1, b"compressed?", rsv=4),
    "bad_utf8": frame(1, b"\xff\xfe"),
    "bad_opcode": frame(3, b""),
    "stray_continuation": frame(0, b"nothing to continue"),
    "text_inside_fragments": frame(1, b"a", fin=False) + text("b"),
    "close": frame(8, struct.pack("!H", 1001) + b"going away"),
}


def answer(client: WSConnection) -> bytes:
    """The server's answer (101) to ``client``'s opening request."""
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host=HANDSHAKE_HOST, target="/")))
    assert any(isinstance(e, Request) for e in server.events())
    return server.send(AcceptConnection())


def messages(events: list[Event]) -> list[tuple[object, ...]]:
    """What trio-websocket makes of the events: whole messages (parts joined), pings,
    pongs, closes; partial parts are how wsproto hands over a frame split between reads."""
    out: list[tuple[object, ...]] = []
    text_parts: list[str] = []
    byte_parts: list[bytes] = []
    for event in events:
        if isinstance(event, TextMessage):
            text_parts.append(event.data)
            if event.message_finished:
                out.append(("text", "".join(text_parts)))
                text_parts = []
        elif isinstance(event, BytesMessage):
            byte_parts.append(bytes(event.data))
            if event.message_finished:
                out.append(("bytes", b"".join(byte_parts)))
                byte_parts = []
        elif isinstance(event, (Ping, Pong)):
            out.append((type(event).__name__, bytes(event.payload)))
        elif isinstance(event, CloseConnection):
            out.append(("close", event.code, event.reason))
        else:
            out.append((type(event).__name__,))
    return out


def feed(conn: WSConnection, reads: list[bytes]) -> list[Event]:
    events: list[Event] = []
    for data in reads:
        conn.receive_data(data)
        events.extend(conn.events())
    return events


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


def both(stream: bytes, cuts: list[int]) -> tuple[list[Event], list[Event]]:
    """The events of a plain client and a fast one given the server's answer to each and
    then ``stream``, in the same reads (the answers differ in the accept key only)."""
    plain, fast = WSConnection(ConnectionType.CLIENT), FastTextFrames()
    return (
        feed(plain, split(answer(plain) + stream, cuts)),
        feed(fast, split(answer(fast) + stream, cuts)),
    )


@pytest.mark.parametrize("name", [*GOOD, *BAD])
def test_each_frame_kind_as_wsproto_in_one_read(name: str) -> None:
    stream = text("before") + {**GOOD, **BAD}[name] + text("after")
    plain, fast = both(stream, [])
    assert fast == plain  # one read: wsproto splits nothing either, so the very events
    assert isinstance(plain[0], AcceptConnection)


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(GOOD)), max_size=12),
    bad=st.none() | st.sampled_from(sorted(BAD)),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=8),
)
def test_any_frames_any_reads_as_wsproto(
    names: list[str], bad: str | None, cuts: list[int]
) -> None:
    stream = b"".join(GOOD[n] for n in names)
    if bad is not None:
        stream += BAD[bad] + text("after the bad frame")
    plain, fast = both(stream, cuts)
    assert messages(fast) == messages(plain)


def test_kline_frames_split_everywhere() -> None:
    """A stream of kline-sized frames cut into reads at random places (64 KiB reads and
    smaller): every message whole, in order, and the fast path parsed them."""
    rng = random.Random(14)
    sent = [f'{{"stream":"s{i}@kline_1m","data":{{"E":{i}}}}}' + " " * rng.randrange(400)
            for i in range(3000)]  # fmt: skip
    stream = b"".join(text(s) for s in sent)
    cuts = [rng.randrange(len(stream)) for _ in range(200)]
    plain, fast = both(stream, cuts)
    assert messages(fast) == messages(plain)
    assert [m[1] for m in messages(fast)[1:]] == sent
    assert all(e.frame_finished for e in fast if isinstance(e, TextMessage))  # never in parts


@pytest.mark.parametrize("cut", [0, 30, 60, 90])
def test_a_rejected_handshake_with_a_body_as_wsproto(cut: int) -> None:
    """A 404 with a body that looks like frames: all of it is wsproto's (HTTP's)."""
    events: list[list[Event]] = []
    for client in (WSConnection(ConnectionType.CLIENT), FastTextFrames()):
        server = WSConnection(ConnectionType.SERVER)
        server.receive_data(client.send(Request(host=HANDSHAKE_HOST, target="/")))
        assert any(isinstance(e, Request) for e in server.events())
        body = text("not a frame, a body") * 3
        length = [(b"content-length", str(len(body)).encode())]  # not chunked: bare frames
        answer = server.send(RejectConnection(status_code=404, headers=length, has_body=True))
        answer += server.send(RejectData(data=body))
        events.append(feed(client, split(answer, [cut, cut + 40])))
    assert events[1] == events[0]
    assert isinstance(events[0][0], RejectConnection)
    assert (
        b"".join(bytes(e.data) for e in events[0] if isinstance(e, RejectData))
        == text("not a frame, a body") * 3
    )


def delivering(refuse: list[bool]) -> tuple[FastTextFrames, list[Event]]:
    """A fast client whose deliver callable takes texts as the events trio-websocket's
    reader would queue from them, in one list with the events yielded; it refuses (the
    queue is full) the n-th text when ``refuse[n % len(refuse)]``."""
    fast, out = FastTextFrames(), list[Event]()
    offered = itertools.count()

    def deliver(data: str) -> bool:
        if refuse and refuse[next(offered) % len(refuse)]:
            return False
        out.append(TextMessage(data=data))
        return True

    fast.deliver_to(deliver)
    return fast, out


@settings(max_examples=300, deadline=None)
@given(
    names=st.lists(st.sampled_from(sorted(GOOD)), max_size=12),
    bad=st.none() | st.sampled_from(sorted(BAD)),
    cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=8),
    refuse=st.lists(st.booleans(), max_size=4),
)
def test_delivered_texts_and_events_in_order_as_wsproto(
    names: list[str], bad: str | None, cuts: list[int], refuse: list[bool]
) -> None:
    """deliver_to: the texts handed over and the events yielded, interleaved as they
    happen, are wsproto's messages in wsproto's order, whichever texts are refused."""
    stream = b"".join(GOOD[n] for n in names)
    if bad is not None:
        stream += BAD[bad] + text("after the bad frame")
    plain = WSConnection(ConnectionType.CLIENT)
    expected = feed(plain, split(answer(plain) + stream, cuts))
    fast, got = delivering(refuse)
    for data in split(answer(fast) + stream, cuts):
        fast.receive_data(data)
        got.extend(fast.events())
    assert messages(got) == messages(expected)


def test_kline_texts_are_delivered_not_yielded() -> None:
    sent = [f'{{"stream":"s{i}@kline_1m","data":{{"E":{i}}}}}' for i in range(100)]
    fast, got = delivering([])
    for data in split(answer(fast) + b"".join(text(s) for s in sent), [5000, 9000]):
        fast.receive_data(data)
        for event in fast.events():  # in turn: the texts delivered meanwhile come first
            assert not isinstance(event, TextMessage)
            got.append(event)
    assert isinstance(got[0], AcceptConnection)
    assert [m[1] for m in messages(got)[1:]] == sent
