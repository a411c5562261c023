from __future__ import annotations

from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import attrs
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import candle
from tradecanvas.errors import SeriesIdError, WireError
from tradecanvas.model import BINANCE_INTERVALS, SeriesId, Timeframe
from tradecanvas.wire.binance import (
    ControlFrame,
    KlineEvent,
    _fast_kline_event,
    decode_frame,
    decode_frame_reference,
    kline_frame,
)
from tradecanvas.wire.binance_rest import candle_from_rest_row, candle_to_rest_row

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
    closed = [e for e in events if e.closed]
    assert sorted(e.symbol for e in closed) == ["AKROUSDT", "CTKUSDT", "KEEPUSDT", "SUSHIUSDT"]
    assert all(e.open_time_ms == 1626992700000 for e in closed)
    assert all(e.event_time_ms > e.close_time_ms for e in closed)  # E > T is normal
    first = events[0]
    assert first.stream == "ctkusdt@kline_1m"
    assert first.candle.open == Decimal("1.01000")
    assert first.candle.candle_time == 1626992700


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
        # finite Decimals whose doubles are not: clients got "volume": null (soak review)
        (_kline(v="1e999"), "bad_kline_values"),
        (_kline(o="1e400", h="1e400", c="1e400"), "bad_kline_values"),
        (_kline(q="1e30"), "bad_kline_values"),
        (_kline(n=2**53 + 1), "bad_kline_values"),
        (_kline(i="7x"), "bad_kline_interval"),
        # k.s is s's copy: a frame whose two symbols differ is no frame of either
        (_kline(s="ETHUSDT"), "symbol_mismatch"),
        (_kline(s=None), "symbol_mismatch"),
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


# --- the fast decoder equals the reference (cattrs) decoder ---------------------------------


def _outcome(decode: Callable[[bytes], object], raw: bytes) -> tuple[object, ...]:
    """What a decoder makes of ``raw``: the answer, exactly (Decimal digits included), or
    its error, word for word."""
    try:
        return ("answer", repr(decode(raw)))
    except WireError as exc:
        return ("error", exc.reason, exc.detail)


_ODD_DECIMALS: tuple[str, ...] = ("NaN", "sNaN", "-Infinity", "Infinity", "-0", "0", "1e3")
_ODD_DECIMALS += ("1E-8", " 1", "1_0", "abc", "", "-1", "-0.001", "0.00000000", "1.01000")
_ODD_DECIMALS += ("1e999", "1e30", "9.99e29", "1e400")  # finite Decimals, some infinite doubles
plain_decimal_texts = st.decimals(min_value=0, max_value=10**9, places=5).map(str)
decimal_texts = st.one_of(*[plain_decimal_texts] * 4, st.sampled_from(_ODD_DECIMALS))
_EDGE_INTEGERS = (-1, 0, -60_000, 1, True, "5", 1.5, None)
_EDGES: dict[str, tuple[object, ...]] = {
    **{key: (*_ODD_DECIMALS, 1, 1.5, None) for key in "ohlcvqVQ"},
    **{key: _EDGE_INTEGERS for key in "tTn"},
    "n": (*_EDGE_INTEGERS, 2**53, 2**53 + 1),
    "x": ("true", 1, None, False),
    "i": ("1w", "1M", "3d", "2m", "7x", 5, None),
}
int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
any_value = st.one_of(
    decimal_texts, int64, st.floats(allow_nan=False), st.booleans(), st.none(), st.just([])
)


@st.composite
def kline_frames(draw: st.DrawFn) -> bytes:
    """Mostly well-formed kline frames, some with a key removed or a value replaced, some
    wrapped oddly: enough of each for both decoders' every branch."""
    prices = sorted(draw(st.lists(plain_decimal_texts, min_size=4, max_size=4)), key=Decimal)
    low, open_, close, high = draw(st.sampled_from((prices, prices, prices, prices[::-1])))
    minute = draw(st.integers(min_value=-2, max_value=40_000_000))
    minute -= minute % draw(st.sampled_from((1, 1440)))  # a day's open fits every length
    open_ms = minute * 60_000 + draw(st.sampled_from((0,) * 8 + (1_000, 1)))
    k: dict[str, object] = {
        "t": open_ms,
        "T": open_ms + draw(st.sampled_from((59_999,) * 5 + (-1,))),
        "s": "BTCUSDT",
        "i": draw(st.sampled_from((*BINANCE_INTERVALS, "1m", "1m", "2m", "7x", "1s", ""))),
        "f": 1,
        "L": 2,
        "o": open_,
        "c": close,
        "h": high,
        "l": low,
        "v": draw(plain_decimal_texts),
        "n": draw(st.integers(min_value=-1, max_value=10**6)),
        "x": draw(st.booleans()),
        "q": draw(plain_decimal_texts),
        "V": draw(plain_decimal_texts),
        "Q": draw(plain_decimal_texts),
        "B": "0",
    }
    edge = draw(st.sampled_from((None, None, *_EDGES)))
    if edge is not None:  # one value at the edge of what is allowed
        k[edge] = draw(st.sampled_from(_EDGES[edge]))
    mutations = draw(st.sampled_from((0, 0, 0, 1, 2)))
    for key in draw(
        st.lists(st.sampled_from(sorted(k)), min_size=mutations, max_size=mutations, unique=True)
    ):
        if draw(st.booleans()):
            del k[key]
        else:
            k[key] = draw(any_value)
    data: dict[str, object] = {"e": "kline", "E": open_ms + 1_000, "s": "BTCUSDT", "k": k}
    changes = draw(st.sampled_from((0, 0, 0, 0, 1, 2)))
    keys = st.sampled_from(("e", "E", "s", "k", "result", "id"))
    for key in draw(st.lists(keys, min_size=changes, max_size=changes, unique=True)):
        data[key] = draw(any_value)
    if draw(st.booleans()):
        return orjson.dumps(data)
    return orjson.dumps(
        {"stream": draw(st.sampled_from(("btcusdt@kline_1m",) * 5 + (5,))), "data": data}
    )


@given(kline_frames())
@settings(max_examples=300, deadline=None)
def test_fast_decoder_equals_the_reference(raw: bytes) -> None:
    assert _outcome(decode_frame, raw) == _outcome(decode_frame_reference, raw)


def test_fast_decoder_equals_the_reference_on_every_captured_frame(data_dir: Path) -> None:
    folder = data_dir / "ws" / "futures_um"
    capture = (folder / "cryptofeed_BINANCE_FUTURES_ws_2021-07-22_raw_capture.txt").read_text()
    frames = [line.split(": ", 1)[1].encode() for line in capture.splitlines()[1:]]
    assert len(frames) == 1535
    for raw in frames:
        assert _outcome(decode_frame, raw) == _outcome(decode_frame_reference, raw)
    # and Binance's kline frames take the fast path (else it would be equal, but not fast)
    klines = [raw for raw in frames if b"@kline_1m" in raw]
    assert len(klines) == 67
    assert all(_fast_kline_event(orjson.loads(raw)) is not None for raw in klines)


@pytest.mark.parametrize(
    "raw",
    [
        _kline(o=1.5),
        _kline(o="NaN"),
        _kline(x="true"),
        _kline(t=60001),
        _kline(h="0.5"),
        _kline(v="-1"),
        _kline(v="-0"),
        _kline(i="7x"),
        _kline(i="1w"),
        _kline(q=None),
        _kline(s="ETHUSDT"),
        b'{"stream":"x","data":{"e":"kline","result":null,"id":3}}',
    ],
)
def test_malformed_or_unusual_frames_decode_as_the_reference_says(raw: bytes) -> None:
    assert _outcome(decode_frame, raw) == _outcome(decode_frame_reference, raw)


def test_every_single_edge_on_captured_frames_decodes_as_the_reference(data_dir: Path) -> None:
    """Each captured kline frame (combined and raw) with one value at an edge, one key
    removed, or one event key changed: every case, not a sample."""
    lines = data_dir / "ws" / "futures_um" / "kline_1m_frames_2021-07-22T22-25Z.jsonl"
    frames = [orjson.loads(line) for line in lines.read_bytes().splitlines() if line.strip()]
    frames = frames[::4] + [f for f in frames if f["data"]["k"]["x"]]  # every symbol, both kinds
    cases = 0
    for frame in frames:
        for doc in (frame, frame["data"]):
            k = doc["data"]["k"] if "stream" in doc else doc["k"]
            variants: list[bytes] = []
            for key, values in _EDGES.items():
                for value in (*values, _DELETE):
                    variants.append(_with(doc, k, key, value))
            for key in ("e", "E", "s", "k", "result", "id"):
                for value in ("kline", "x", 1, None, [], _DELETE):
                    variants.append(_with(doc, doc.get("data", doc), key, value))
            variants.append(
                _with(doc, doc.get("data", doc), "result", None).replace(b"{", b'{"id":1,', 2)
            )
            for raw in variants:
                assert _outcome(decode_frame, raw) == _outcome(decode_frame_reference, raw), raw
                cases += 1
    assert cases > 5_000


_DELETE: Final = object()


def _with(doc: dict[str, Any], inner: dict[str, Any], key: str, value: object) -> bytes:
    """``doc`` encoded with ``inner[key]`` (``inner`` is inside ``doc``) set to ``value``
    or removed."""
    had, old = key in inner, inner.get(key)
    if value is _DELETE:
        inner.pop(key, None)
    else:
        inner[key] = value
    try:
        return orjson.dumps(doc)
    finally:
        if had:
            inner[key] = old
        else:
            inner.pop(key, None)


def test_replays_frames_and_rest_rows_print_decimals_as_binance_does() -> None:
    """Binance prints 0.00000060, never 6.0E-7 (str of a Decimal) or 0E-8."""
    tiny = attrs.evolve(
        candle(60, "0.00000060", "0.00000061", "0.00000059", "0.00000060"),
        volume=Decimal("0E-8"),
        quote_volume=Decimal("1.2E-7"),
    )
    series = SeriesId.parse("binance:spot:BTTC/USDT:1m")
    k = kline_frame(series, tiny, closed=True, event_time_ms=120_000)["data"]["k"]  # type: ignore[index]
    row = candle_to_rest_row(tiny, series.timeframe)
    for texts in ([k["o"], k["h"], k["l"], k["c"], k["v"], k["q"]], row[1:6] + row[7:8]):
        assert texts == [
            "0.00000060",
            "0.00000061",
            "0.00000059",
            "0.00000060",
            "0.00000000",
            "0.00000012",
        ]
    # and they decode to the same values
    assert candle_from_rest_row(row, series.timeframe).same_values(tiny)
