"""Binance's WebSocket kline frames ↔ model (DESIGN §2, BINANCE.md); its REST rows are in
:mod:`~tradecanvas.wire.binance_rest`.

All of Binance's one-letter keys and string decimals live here; the attrs classes below
carry Pythonic names. Anything malformed raises :class:`~tradecanvas.errors.WireError` with
a short ``reason``.

A kline frame is decoded twice over, on purpose: :func:`decode_frame_reference` is the
readable definition — the cattrs converter built by :func:`make_binance_converter`, then
the checks of :func:`~tradecanvas.model.validate_candle` — and :func:`decode_frame` is the
hot path every received frame takes (orjson, then the attrs classes built directly, with
the same checks written out). The fast path only ever *accepts*: a frame it has any doubt
about (a control frame, a wrong type, a value out of range, an interval other than the
epoch-aligned ones) goes to the reference, which gives the answer or the error. The tests
prove the two equal over generated and captured frames, malformed ones included.
"""

from __future__ import annotations

import operator
from decimal import Decimal, InvalidOperation
from typing import Any, Final, NamedTuple

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, override

from tradecanvas.errors import CandleError, WireError
from tradecanvas.model import (
    BINANCE_INTERVALS,
    MAX_TRADES,
    MAX_VALUE,
    MS,
    Candle,
    SeriesId,
    Timeframe,
    validate_candle,
)


class KlineEvent(NamedTuple):
    """A decoded kline frame: the event time and symbol, the bar of its ``k`` object as a
    :class:`Candle` (open time in seconds, exact decimals) with what only the frame says
    about it, and ``stream`` for a combined-stream frame (None for a raw one). Of the
    ``k`` keys, the trade ids (``f``, ``L``) and ``B`` are not read, and the symbol's copy
    (``s``) only checked: a frame whose ``k.s`` is not its ``s`` is refused
    (``symbol_mismatch``; whether ``s`` is its stream's symbol is the ingest's check).

    A NamedTuple, not a frozen attrs class like the rest: one is built for every frame
    received, and it builds in about a third of the time (0.15 against 0.45 µs), which is
    a tenth of the whole decode."""

    event_time_ms: int
    symbol: str
    open_time_ms: int
    close_time_ms: int
    interval: str
    closed: bool
    candle: Candle
    stream: str | None = None

    @property
    def stream_name(self) -> str:
        return self.stream or f"{self.symbol.lower()}@kline_{self.interval}"


@attrs.frozen
class ControlFrame:
    """A non-kline frame: a subscribe ack, ``serverShutdown``, or another event we ignore."""

    kind: str  # "ack" | "server_shutdown" | "ignored"
    detail: str = ""


@attrs.frozen
class _WireKline:
    """The ``k`` object field by field, as the converter structures it."""

    open_time_ms: int
    close_time_ms: int
    interval: str
    open: Decimal
    close: Decimal
    high: Decimal
    low: Decimal
    volume: Decimal
    trades: int
    closed: bool
    quote_volume: Decimal | None = None
    taker_buy_base: Decimal | None = None
    taker_buy_quote: Decimal | None = None

    def to_candle(self) -> Candle:
        return Candle(
            candle_time=self.open_time_ms // MS,
            open=self.open,
            high=self.high,
            low=self.low,
            close=self.close,
            volume=self.volume,
            quote_volume=self.quote_volume,
            trades=self.trades,
            taker_buy_base=self.taker_buy_base,
            taker_buy_quote=self.taker_buy_quote,
        )


@attrs.frozen
class _WireKlineEvent:
    event_time_ms: int
    symbol: str
    kline: _WireKline


def structure_decimal(value: object, _: type) -> Decimal:
    if not isinstance(value, str):
        raise WireError("bad_decimal", f"expected a decimal string, got {value!r}")
    try:
        result = Decimal(value)
    except InvalidOperation:
        raise WireError("bad_decimal", f"not a decimal: {value!r}") from None
    if not result.is_finite():
        raise WireError("bad_decimal", f"not a finite decimal: {value!r}")
    return result


def structure_int(value: object, _: type) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise WireError("bad_integer", f"expected an integer, got {value!r}")
    return value


def _structure_bool(value: object, _: type) -> bool:
    if not isinstance(value, bool):
        raise WireError("bad_boolean", f"expected true/false, got {value!r}")
    return value


def _structure_str(value: object, _: type) -> str:
    if not isinstance(value, str):
        raise WireError("bad_string", f"expected a string, got {value!r}")
    return value


def make_binance_converter() -> cattrs.Converter:
    """The one converter that knows Binance's kline keys and value types (the reference
    decoder's; :func:`decode_frame` writes the same rules out by hand)."""
    conv = cattrs.Converter(detailed_validation=False)
    conv.register_structure_hook(Decimal, structure_decimal)
    conv.register_structure_hook(int, structure_int)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(
        _WireKline,
        make_dict_structure_fn(
            _WireKline,
            conv,
            open_time_ms=override(rename="t"),
            close_time_ms=override(rename="T"),
            interval=override(rename="i"),
            open=override(rename="o"),
            close=override(rename="c"),
            high=override(rename="h"),
            low=override(rename="l"),
            volume=override(rename="v"),
            trades=override(rename="n"),
            closed=override(rename="x"),
            quote_volume=override(rename="q"),
            taker_buy_base=override(rename="V"),
            taker_buy_quote=override(rename="Q"),
        ),
    )
    conv.register_structure_hook(
        _WireKlineEvent,
        make_dict_structure_fn(
            _WireKlineEvent,
            conv,
            event_time_ms=override(rename="E"),
            symbol=override(rename="s"),
            kline=override(rename="k"),
        ),
    )
    return conv


_CONVERTER: Final = make_binance_converter()


def decode_wire_json(raw: bytes | str) -> Any:
    """JSON from Binance (or anything upstream): a body that is not JSON, such as an HTML
    maintenance page behind a 200, raises WireError like every other malformed answer."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError("not_json", str(exc)) from None


def decode_frame_reference(raw: bytes | str) -> KlineEvent | ControlFrame:
    """Decode one WS frame, combined (``{"stream","data"}``) or raw, the readable way
    (cattrs, then validate_candle). Raises WireError. :func:`decode_frame` is equal to it
    and faster."""
    return _decode_document(decode_wire_json(raw))


def _decode_document(doc: object) -> KlineEvent | ControlFrame:
    if not isinstance(doc, dict):
        raise WireError("not_object", f"frame is a {type(doc).__name__}")
    stream: str | None = None
    if "data" in doc and "stream" in doc:
        stream = doc["stream"]
        if not isinstance(stream, str):
            raise WireError("bad_stream", f"stream must be a string, got {stream!r}")
        doc = doc["data"]
        if not isinstance(doc, dict):
            raise WireError("not_object", f"data is a {type(doc).__name__}")
    if "result" in doc and "id" in doc:
        return ControlFrame("ack", str(doc.get("id")))
    event_type = doc.get("e")
    if event_type == "serverShutdown":
        return ControlFrame("server_shutdown")
    if event_type != "kline":
        if event_type is None:
            raise WireError("no_event_type", "frame has neither an event type nor a result")
        return ControlFrame("ignored", str(event_type))
    try:
        wire: _WireKlineEvent = _CONVERTER.structure(doc, _WireKlineEvent)
    except WireError:
        raise
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as exc:
        raise WireError("bad_kline", f"{type(exc).__name__}: {exc}") from None
    k = wire.kline
    if k.open_time_ms % MS or k.close_time_ms < k.open_time_ms:
        raise WireError("bad_kline_times", f"t={k.open_time_ms} T={k.close_time_ms}")
    candle = k.to_candle()
    try:
        validate_candle(candle, Timeframe.parse(k.interval))
    except CandleError as exc:
        raise WireError("bad_kline_values", str(exc)) from None
    except Exception as exc:
        raise WireError("bad_kline_interval", str(exc)) from None
    kline_symbol = doc["k"].get("s", wire.symbol)
    if kline_symbol != wire.symbol:
        raise WireError("symbol_mismatch", f"s={wire.symbol!r} but k.s={kline_symbol!r}")
    return KlineEvent(
        wire.event_time_ms,
        wire.symbol,
        k.open_time_ms,
        k.close_time_ms,
        k.interval,
        k.closed,
        candle,
        stream,
    )


# The intervals the fast path checks the alignment of itself: interval → the length its
# open times are epoch multiples of (0: a phased one, 3d, whose open times are not checked).
# 1w and 1M (and anything else) take the reference path.
_FAST_ALIGNMENT: Final = {
    text: 0 if tf.phased else tf.seconds
    for text in BINANCE_INTERVALS
    if not (tf := Timeframe.parse(text)).is_month and not tf.is_week
}


_EVENT_KEYS: Final = operator.itemgetter("e", "E", "s", "k")
_KLINE_KEYS: Final = operator.itemgetter(
    "t", "T", "i", "x", "n", "o", "h", "l", "c", "v", "q", "V", "Q"
)  # fmt: skip
# Recent price strings and their Decimals: a stream repeats its open for a whole minute and
# its high, low and close often, and a lookup costs a third of a Decimal (1.6k distinct
# prices are a few hundred KiB; the memo is emptied when full). Decimals are immutable, and
# equal strings give equal Decimals (the same digits and exponent), so sharing is safe.
_PRICES: Final[dict[str, Decimal]] = {}
_PRICES_MAX: Final = 4096


def _remember_price(text: str) -> Decimal:
    value = Decimal(text)
    if len(_PRICES) >= _PRICES_MAX:
        _PRICES.clear()
    _PRICES[text] = value
    return value


def decode_frame(raw: bytes | str) -> KlineEvent | ControlFrame:
    """Decode one WS frame, combined (``{"stream","data"}``) or raw. Raises WireError.

    Equal to :func:`decode_frame_reference` for every input (answer or error)."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError("not_json", str(exc)) from None
    try:
        event = _fast_kline_event(doc)
    except (KeyError, TypeError, ArithmeticError):  # InvalidOperation is an ArithmeticError
        event = None
    return event if event is not None else _decode_document(doc)


def _fast_kline_event(doc: object) -> KlineEvent | None:
    """A well-formed kline frame's event, or None (the reference decides). Every check of
    the reference is here; a frame that passes them all is the reference's answer. Raises
    KeyError, TypeError or ArithmeticError for some frames that do not (the caller takes
    them as a None)."""
    if type(doc) is not dict:
        return None
    if "data" in doc and "stream" in doc:
        stream, data = doc["stream"], doc["data"]
        if type(stream) is not str or type(data) is not dict:
            return None
    else:
        stream, data = None, doc
    if "result" in data and "id" in data:
        return None
    event_type, event_ms, symbol, k = _EVENT_KEYS(data)
    if event_type != "kline" or type(k) is not dict:
        return None
    # every key at once (a frame without q, V or Q goes to the reference: Binance's have them)
    open_ms, close_ms, interval, closed, trades, o, h, lo, c, v, q, tb, tq = _KLINE_KEYS(k)
    if not (
        type(event_ms) is int
        and type(open_ms) is int
        and type(close_ms) is int
        and type(trades) is int
        and type(closed) is bool
        and type(symbol) is str
        and type(o) is str
        and type(h) is str
        and type(lo) is str
        and type(c) is str
        and type(v) is str
        and type(q) is str
        and type(tb) is str
        and type(tq) is str
    ):
        return None
    alignment = _FAST_ALIGNMENT.get(interval)  # an unhashable interval: TypeError
    t = open_ms // MS
    if (
        alignment is None
        or open_ms % MS
        or close_ms < open_ms
        or t < 0
        or (alignment and t % alignment)
        or trades < 0
        or k.get("s", symbol) != symbol
    ):
        return None
    prices = _PRICES
    open_ = prices.get(o)
    if open_ is None:
        open_ = _remember_price(o)
    high = prices.get(h)
    if high is None:
        high = _remember_price(h)
    low = prices.get(lo)
    if low is None:
        low = _remember_price(lo)
    close = prices.get(c)
    if close is None:
        close = _remember_price(c)
    volume, quote, taker_base, taker_quote = Decimal(v), Decimal(q), Decimal(tb), Decimal(tq)
    # the rules of validate_candle, cheapest first (a Decimal comparison costs about as much
    # as two method calls): a NaN compares with an InvalidOperation (or False), every price
    # lies between low and high, a finite high and a low that is not signed (-Infinity is)
    # bound them all; is_signed also refuses -0, which the reference accepts (and will)
    if not (
        high < MAX_VALUE  # (also refuses a NaN and +Infinity; -Infinity is signed)
        and volume < MAX_VALUE
        and quote < MAX_VALUE
        and taker_base < MAX_VALUE
        and taker_quote < MAX_VALUE
        and trades <= MAX_TRADES
        and not low.is_signed()
        and not volume.is_signed()
        and not quote.is_signed()
        and not taker_base.is_signed()
        and not taker_quote.is_signed()
        and low <= open_ <= high
        and low <= close <= high
    ):
        return None
    candle = Candle(t, open_, high, low, close, volume, quote, trades, taker_base, taker_quote)
    return KlineEvent(event_ms, symbol, open_ms, close_ms, interval, closed, candle, stream)


def plain(value: Decimal | int) -> str:
    """A decimal as Binance prints it: plain digits, never an exponent (``str`` gives
    ``6.0E-7`` for ``0.00000060`` and ``0E-8`` for ``0.00000000``)."""
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def kline_frame(
    series: SeriesId, candle: Candle, *, closed: bool, event_time_ms: int
) -> dict[str, object]:
    """A Binance combined-stream kline frame for ``candle`` (used by ``tradecanvas replay``)."""
    open_ms = candle.candle_time * MS
    return {
        "stream": series.stream_name,
        "data": {
            "e": "kline",
            "E": event_time_ms,
            "s": series.rest_symbol,
            "k": {
                "t": open_ms,
                "T": series.timeframe.next_open(candle.candle_time) * MS - 1,
                "s": series.rest_symbol,
                "i": series.timeframe.text,
                "f": -1 if not candle.trades else 1,
                "L": -1 if not candle.trades else candle.trades,
                "o": plain(candle.open),
                "c": plain(candle.close),
                "h": plain(candle.high),
                "l": plain(candle.low),
                "v": plain(candle.volume),
                "n": candle.trades or 0,
                "x": closed,
                "q": plain(candle.quote_volume or 0),
                "V": plain(candle.taker_buy_base or 0),
                "Q": plain(candle.taker_buy_quote or 0),
                "B": "0",
            },
        },
    }
