"""The bus's payloads: what the ingest encodes, an edge decodes exactly."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.errors import WireError
from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.wire.bus import (
    decode_candle,
    decode_event,
    decode_forming,
    encode_candle,
    encode_event,
    encode_forming,
)

decimals = st.decimals(
    allow_nan=False, allow_infinity=False, places=8, min_value=0, max_value=10**9
)


@st.composite
def candles(draw: st.DrawFn) -> Candle:
    """Any bar the ingest could commit: on a minute, low ≤ open, close ≤ high."""
    low, a, b, high = sorted(draw(st.lists(decimals, min_size=4, max_size=4)))
    return Candle(
        60 * draw(st.integers(0, 2**34)),
        a,
        high,
        low,
        b,
        draw(decimals),
        draw(st.none() | decimals),
        draw(st.none() | st.integers(0, 10**9)),
        draw(st.none() | decimals),
        draw(st.none() | decimals),
    )


@given(candles())
def test_a_candle_comes_back_exactly(candle: Candle) -> None:
    back = decode_candle(encode_candle(candle))
    assert back == candle
    # the decimal text too (1.10 stays 1.10), as the store keeps it
    assert [str(getattr(back, n)) for n in ("open", "close", "volume")] == [
        str(getattr(candle, n)) for n in ("open", "close", "volume")
    ]


def test_a_forming_candle_carries_its_series() -> None:
    candle = Candle(60, Decimal("1.10"), Decimal("2"), Decimal("1"), Decimal("1.5"), Decimal("3"))
    assert decode_forming(encode_forming("binance:spot:BTC/USDT:1m", candle)) == (
        "binance:spot:BTC/USDT:1m",
        candle,
    )


def test_an_event_comes_back_with_its_id() -> None:
    event = SystemEvent("binance:futures:BTC/USDT:1m", "backfill", 60, 120, event_id=7)
    back = decode_event(encode_event(event))
    assert (back.series_id, back.reason, back.from_time, back.to_time, back.event) == (
        event.series_id,
        "backfill",
        60,
        120,
        "factor.rebuild",
    )
    assert back.event_id == 7


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"{}",
        b"[1,2,3]",
        b'[60,"1","1","1","1","x",null,null,null,null]',
        b'[true,"1","1","1","1","1",null,null,null,null]',
        b'[60,1,"1","1","1","1",null,null,null,null]',
        b'[60,"1","1","1","1","1",null,"3",null,null]',
        # well-formed, but no bar the ingest commits (a Redis others can write to)
        b'[60,"sNaN","1","1","1","1",null,null,null,null]',
        b'[60,"1","Infinity","1","1","1",null,null,null,null]',
        b'[60,"1","1","1","1","-1",null,null,null,null]',
        b'[60,"-5","1e308","-7","-1","1",null,null,null,null]',
        b'[60,"99","2","1","1","1",null,null,null,null]',
        b'[61,"1","1","1","1","1",null,null,null,null]',
        b'[-60,"1","1","1","1","1",null,null,null,null]',
        b'[60,"1","1","1","1","1","-2",null,null,null]',
    ],
)
def test_a_malformed_candle_is_a_wire_error(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode_candle(raw)


@pytest.mark.parametrize(
    "raw",
    [
        b"[]",
        b'{"event_id":0,"series_id":"s","event":"gap","reason":"r"}',
        b'{"event_id":1,"series_id":3,"event":"gap","reason":"r"}',
        b'{"event_id":1,"series_id":"s","event":"gap","reason":"r","from_time":"1"}',
    ],
)
def test_a_malformed_event_is_a_wire_error(raw: bytes) -> None:
    with pytest.raises(WireError):
        decode_event(raw)
