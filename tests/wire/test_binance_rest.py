from __future__ import annotations

import orjson
import pytest

from tests.conftest import candle
from tradecanvas.errors import WireError
from tradecanvas.model import Timeframe
from tradecanvas.wire.binance_rest import (
    candle_from_rest_row,
    candle_to_rest_row,
    decode_rest_klines,
)

M1 = Timeframe.parse("1m")


def test_rest_rows_round_trip() -> None:
    c = candle(120, "1.50", "2", "1", "2")
    row = orjson.loads(orjson.dumps(candle_to_rest_row(c, M1)))
    back = candle_from_rest_row(row, M1)
    assert back.same_values(c) and str(back.open) == "1.50"
    assert row[6] == 120_000 + 59_999
    with pytest.raises(WireError):
        candle_from_rest_row([120_000, "1", "0.5", "1", "1", "1"], M1)
    with pytest.raises(WireError):
        candle_from_rest_row({"t": 1}, M1)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"<html>maintenance</html>", "not_json"),
        (b'{"code":-1121}', "bad_rest_body"),
        (b'[[120000,"1","2","1",3,"1"]]', "bad_decimal"),
        (b'[[120000.5,"1","2","1","2","1"]]', "bad_integer"),
        (b'[[120500,"1","2","1","2","1"]]', "bad_rest_row"),
    ],
)
def test_bad_rest_bodies_raise_one_wire_error(body: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode_rest_klines(body, M1)
    assert info.value.reason == reason
