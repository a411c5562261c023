"""Messages encoded once: the same text as the one-by-one encoding, frames a WebSocket client
reads back, and reuse only for the very candles that were published."""

from __future__ import annotations

import wsproto
import wsproto.events
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import flat_minutes
from tradecanvas.serve.encoded import Encoded, SharedEncodings, text_frame
from tradecanvas.serve.outgoing import ClosedCandles, FormingCandle, WholeMessage, encode

SID = "binance:futures:BTC/USDT:1m"
T0 = 1751760000


def client_reads(data: bytes) -> list[str]:
    """What a real WebSocket client (wsproto, after its handshake) reads from ``data``."""
    client = wsproto.WSConnection(wsproto.ConnectionType.CLIENT)
    server = wsproto.WSConnection(wsproto.ConnectionType.SERVER)
    server.receive_data(client.send(wsproto.events.Request(host="x", target="/ws/market")))
    request = next(server.events())
    assert isinstance(request, wsproto.events.Request)
    client.receive_data(server.send(wsproto.events.AcceptConnection()))
    assert isinstance(next(client.events()), wsproto.events.AcceptConnection)
    client.receive_data(data)
    texts = []
    for event in client.events():
        assert isinstance(event, wsproto.events.TextMessage) and event.message_finished
        texts.append(event.data)
    return texts


@given(st.text(max_size=70_000))
def test_a_text_frame_reads_back_as_its_text(text: str) -> None:
    assert client_reads(text_frame(text.encode())) == [text]


def test_frames_of_every_length_class_read_back_in_order() -> None:
    texts = ["a" * n for n in (0, 125, 126, 65535, 65536, 70_000)]
    assert client_reads(b"".join(Encoded.of_text(t).frame for t in texts)) == texts


def test_published_candles_are_encoded_once_as_the_one_by_one_encoding_would() -> None:
    candles = list(flat_minutes(T0, 3))
    shared = SharedEncodings(catchup_limit=2)
    published = shared.published(SID, candles)
    single = ClosedCandles(SID, tuple(candles), batch=False)
    batch = ClosedCandles(SID, tuple(candles[:2]), batch=True)
    assert [e.text for e in shared.encode(single)] == encode(single, 2)
    assert [e.text for e in shared.encode(batch)] == encode(batch, 2)
    # the very same objects for every subscriber of the publish
    assert shared.encode(single)[0] is published.closed()[0]
    assert shared.encode(single)[1] is shared.encode(single)[1]
    # three candles in a batch message of at most two: split, as the one-by-one encoding
    whole = ClosedCandles(SID, tuple(candles), batch=True)
    assert [e.text for e in shared.encode(whole)] == encode(whole, 2)
    assert published.frames(True, 2) is None
    assert client_reads(published.frames(False, 2) or b"") == encode(single, 2)


def test_candles_read_from_the_store_are_encoded_afresh() -> None:
    candles = list(flat_minutes(T0, 2))
    shared = SharedEncodings(catchup_limit=10)
    published = shared.published(SID, candles)
    # equal values, other objects (a store read): not the published encoding
    again = tuple(flat_minutes(T0, 2))
    encoded = shared.encode(ClosedCandles(SID, again, batch=False))
    assert [e.text for e in encoded] == [e.text for e in published.closed()]
    assert all(e is not p for e, p in zip(encoded, published.closed(), strict=True))
    # a coalesced message holding one published candle reuses that one only
    mixed = shared.encode(ClosedCandles(SID, (again[0], candles[1]), batch=False))
    assert mixed[1] is published.closed()[1] and mixed[0] is not published.closed()[0]


def test_forming_and_whole_messages() -> None:
    candle = next(iter(flat_minutes(T0, 1)))
    shared = SharedEncodings(catchup_limit=10)
    forming = shared.encode(FormingCandle(SID, candle))
    assert [e.text for e in forming] == encode(FormingCandle(SID, candle), 10)
    assert shared.encode(FormingCandle(SID, candle))[0] is forming[0]
    assert [e.text for e in shared.encode(WholeMessage('{"type":"pong"}'))] == ['{"type":"pong"}']
