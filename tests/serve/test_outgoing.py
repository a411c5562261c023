"""The wire text of every outgoing message (DESIGN §3), without sockets."""

from __future__ import annotations

from typing import Final

from tests.conftest import flat_minutes
from tradecanvas.serve.outgoing import ClosedCandles, FormingCandle, Gap, WholeMessage, encode
from tradecanvas.wire.json import loads

SID: Final = "binance:futures:BTC/USDT:1m"
T0: Final = 1751760000


def test_closed_candles_are_batches_of_at_most_catchup_limit_or_one_message_each() -> None:
    candles = tuple(flat_minutes(T0, 20, price="108123.45"))
    batches = [loads(text) for text in encode(ClosedCandles(SID, candles, True), 7)]
    assert [len(b["candles"]) for b in batches] == [7, 7, 6]
    assert batches[0] == {
        "type": "candles_batch",
        "series_id": SID,
        "candles": [c.to_wire() for c in candles[:7]],
    }
    plain = [loads(text) for text in encode(ClosedCandles(SID, candles[:3], False), 7)]
    assert plain == [
        {"type": "candle_closed", "series_id": SID, "candle": c.to_wire()} for c in candles[:3]
    ]


def test_gap_forming_and_whole_messages() -> None:
    (candle,) = flat_minutes(T0, 1)
    assert [loads(t) for t in encode(Gap(SID, T0, T0 + 180), 5000)] == [
        {"type": "gap", "series_id": SID, "expected_next_time": T0, "actual_time": T0 + 180}
    ]
    assert [loads(t) for t in encode(FormingCandle(SID, candle), 5000)] == [
        {"type": "candle_forming", "series_id": SID, "candle": candle.to_wire()}
    ]
    assert encode(WholeMessage('{"type":"pong"}'), 5000) == ['{"type":"pong"}']
