from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import orjson
import pytest

from tests.conftest import candle
from tradecanvas.errors import SeriesIdError, WireError
from tradecanvas.model import SeriesId, Timeframe
from tradecanvas.wire.binance import (
    ControlFrame,
    KlineEvent,
    candle_from_rest_row,
    candle_to_rest_row,
    decode_frame,
    kline_frame,
)

M1 = Timeframe.parse("1m")


def test_series_id_parsing_and_stream_names() -> None:
    s = SeriesId.parse("binance:futures:BTC/USDT:USDT:1m")
    assert (s.exchange, s.market, s.symbol, s.timeframe.seconds) == (
        "binance",
        "futures",
        "BTC/USDT:USDT",
        60,
    )
    assert s.stream_name == "btcusdt@kline_1m"
    assert str(s.with_timeframe(Timeframe.parse("4h"))) == "binance:futures:BTC/USDT:USDT:4h"


@pytest.mark.parametrize(
    ("text", "part"),
    [
        ("binance:futures:BTC/USDT", "expected exchange:market:symbol:timeframe"),
        ("kraken:futures:BTC/USDT:1m", "unknown exchange 'kraken'"),
        ("binance:margin:BTC/USDT:1m", "unknown market 'margin'"),
        ("binance:spot:btc/usdt:1m", "bad symbol 'btc/usdt'"),
        ("binance:spot:BTC/USDT:1y", "bad timeframe '1y'"),
        ("binance:spot:BTC/USDT:0m", "bad timeframe '0m'"),
        ("", "non-empty string"),
    ],
)
def test_series_id_errors_name_the_part(text: str, part: str) -> None:
    with pytest.raises(SeriesIdError, match=part.replace("(", r"\(")):
        SeriesId.parse(text)


def test_every_captured_kline_frame_decodes(data_dir: Path) -> None:
    lines = data_dir / "ws" / "futures_um" / "kline_1m_frames_2021-07-22T22-25Z.jsonl"
    frames = [decode_frame(line) for line in lines.read_bytes().splitlines() if line.strip()]
    assert len(frames) == 67
    events = [f for f in frames if isinstance(f, KlineEvent)]
    assert len(events) == 67
    closed = [e for e in events if e.kline.closed]
    assert sorted(e.symbol for e in closed) == ["AKROUSDT", "CTKUSDT", "KEEPUSDT", "SUSHIUSDT"]
    assert all(e.kline.open_time_ms == 1626992700000 for e in closed)
    assert all(e.event_time_ms > e.kline.close_time_ms for e in closed)  # E > T is normal
    first = events[0]
    assert first.stream == "ctkusdt@kline_1m"
    assert first.kline.to_candle().open == Decimal("1.01000")
    assert first.kline.to_candle().candle_time == 1626992700


def test_raw_capture_non_kline_frames_are_ignored(data_dir: Path) -> None:
    path = (
        data_dir / "ws" / "futures_um" / "cryptofeed_BINANCE_FUTURES_ws_2021-07-22_raw_capture.txt"
    )
    kinds: dict[str, int] = {}
    for line in path.read_text().splitlines()[1:]:
        frame = decode_frame(line.split(": ", 1)[1])
        key = "kline" if isinstance(frame, KlineEvent) else frame.kind
        kinds[key] = kinds.get(key, 0) + 1
    assert kinds["kline"] == 67
    assert set(kinds) == {"kline", "ignored"}


def test_raw_frame_and_control_frames() -> None:
    frame = kline_frame(
        SeriesId.parse("binance:spot:ETH/USDT:1m"),
        candle(120, "1", "2", "1", "2"),
        closed=True,
        event_time_ms=180_001,
    )
    raw = orjson.dumps(frame["data"])
    event = decode_frame(raw)
    assert isinstance(event, KlineEvent) and event.stream is None
    assert event.stream_name == "ethusdt@kline_1m"
    assert decode_frame(b'{"result":null,"id":1}') == ControlFrame("ack", "1")
    assert decode_frame(b'{"e":"serverShutdown","E":1}') == ControlFrame("server_shutdown")


def _kline(**changes: object) -> bytes:
    frame = kline_frame(
        SeriesId.parse("binance:futures:BTC/USDT:1m"),
        candle(60, "1", "2", "1", "2"),
        closed=False,
        event_time_ms=61_000,
    )
    k = frame["data"]["k"]  # type: ignore[index]
    k.update(changes)
    return orjson.dumps(frame)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{not json", "not_json"),
        (b"[1,2]", "not_object"),
        (b'{"stream":"x","data":[]}', "not_object"),
        (b'{"stream":"x","data":{"x":1}}', "no_event_type"),
        (_kline(o=1.5), "bad_decimal"),
        (_kline(o="abc"), "bad_decimal"),
        (_kline(o="NaN"), "bad_decimal"),
        (_kline(x="true"), "bad_boolean"),
        (_kline(t="60000"), "bad_integer"),
        (_kline(n=True), "bad_integer"),
        (_kline(t=60001), "bad_kline_times"),
        (_kline(h="0.5"), "bad_kline_values"),
        (_kline(v="-1"), "bad_kline_values"),
        (_kline(i="7x"), "bad_kline_interval"),
    ],
)
def test_malformed_frames_raise_one_wire_error(raw: bytes, reason: str) -> None:
    with pytest.raises(WireError) as info:
        decode_frame(raw)
    assert info.value.reason == reason


def test_missing_key_is_a_wire_error() -> None:
    doc = orjson.loads(_kline())
    del doc["data"]["k"]["c"]
    with pytest.raises(WireError) as info:
        decode_frame(orjson.dumps(doc))
    assert info.value.reason == "bad_kline"


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
