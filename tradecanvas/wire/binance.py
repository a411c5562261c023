"""Binance's wire formats ↔ model: kline frames and REST kline rows (DESIGN §2, BINANCE.md).

All of Binance's one-letter keys and string decimals live in the single converter built
by :func:`make_binance_converter`; the attrs classes below carry Pythonic names. Anything
malformed raises :class:`~tradecanvas.errors.WireError` with a short ``reason``.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any, Final

import attrs
import cattrs
import orjson
from cattrs.gen import make_dict_structure_fn, override

from tradecanvas.errors import CandleError, WireError
from tradecanvas.model import MS, Candle, SeriesId, Timeframe, validate_candle


@attrs.frozen
class Kline:
    """The ``k`` object of a kline event."""

    open_time_ms: int
    close_time_ms: int
    symbol: str
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
    first_trade_id: int | None = None
    last_trade_id: int | None = None

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
class KlineEvent:
    """A decoded kline frame; ``stream`` is set for combined-stream frames."""

    event_time_ms: int
    symbol: str
    kline: Kline
    stream: str | None = None

    @property
    def stream_name(self) -> str:
        return self.stream or f"{self.symbol.lower()}@kline_{self.kline.interval}"


@attrs.frozen
class ControlFrame:
    """A non-kline frame: a subscribe ack, ``serverShutdown``, or another event we ignore."""

    kind: str  # "ack" | "server_shutdown" | "ignored"
    detail: str = ""


def _structure_decimal(value: object, _: type) -> Decimal:
    if not isinstance(value, str):
        raise WireError("bad_decimal", f"expected a decimal string, got {value!r}")
    try:
        result = Decimal(value)
    except InvalidOperation:
        raise WireError("bad_decimal", f"not a decimal: {value!r}") from None
    if not result.is_finite():
        raise WireError("bad_decimal", f"not a finite decimal: {value!r}")
    return result


def _structure_int(value: object, _: type) -> int:
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
    """The one converter that knows Binance's kline keys and value types."""
    conv = cattrs.Converter(detailed_validation=False)
    conv.register_structure_hook(Decimal, _structure_decimal)
    conv.register_structure_hook(int, _structure_int)
    conv.register_structure_hook(bool, _structure_bool)
    conv.register_structure_hook(str, _structure_str)
    conv.register_structure_hook(
        Kline,
        make_dict_structure_fn(
            Kline,
            conv,
            open_time_ms=override(rename="t"),
            close_time_ms=override(rename="T"),
            symbol=override(rename="s"),
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
            first_trade_id=override(rename="f"),
            last_trade_id=override(rename="L"),
        ),
    )
    conv.register_structure_hook(
        KlineEvent,
        make_dict_structure_fn(
            KlineEvent,
            conv,
            event_time_ms=override(rename="E"),
            symbol=override(rename="s"),
            kline=override(rename="k"),
            stream=override(omit=True),
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


def decode_frame(raw: bytes | str) -> KlineEvent | ControlFrame:
    """Decode one WS frame, combined (``{"stream","data"}``) or raw. Raises WireError."""
    doc = decode_wire_json(raw)
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
        event: KlineEvent = _CONVERTER.structure(doc, KlineEvent)
    except WireError:
        raise
    except (cattrs.BaseValidationError, KeyError, TypeError, ValueError) as exc:
        raise WireError("bad_kline", f"{type(exc).__name__}: {exc}") from None
    k = event.kline
    if k.open_time_ms % MS or k.close_time_ms < k.open_time_ms:
        raise WireError("bad_kline_times", f"t={k.open_time_ms} T={k.close_time_ms}")
    try:
        validate_candle(k.to_candle(), Timeframe.parse(k.interval))
    except CandleError as exc:
        raise WireError("bad_kline_values", str(exc)) from None
    except Exception as exc:
        raise WireError("bad_kline_interval", str(exc)) from None
    return attrs.evolve(event, stream=stream)


def candle_from_rest_row(row: object, timeframe: Timeframe) -> Candle:
    """One REST ``klines`` row ``[openTime, o, h, l, c, v, closeTime, q, n, V, Q, ignore]``."""
    if not isinstance(row, list) or len(row) < 6:
        raise WireError("bad_rest_row", f"expected a list of 12 fields, got {row!r:.120}")
    try:
        open_ms = _structure_int(row[0], int)
        candle = Candle(
            candle_time=open_ms // MS,
            open=_structure_decimal(row[1], Decimal),
            high=_structure_decimal(row[2], Decimal),
            low=_structure_decimal(row[3], Decimal),
            close=_structure_decimal(row[4], Decimal),
            volume=_structure_decimal(row[5], Decimal),
            quote_volume=_structure_decimal(row[7], Decimal) if len(row) > 7 else None,
            trades=_structure_int(row[8], int) if len(row) > 8 else None,
            taker_buy_base=_structure_decimal(row[9], Decimal) if len(row) > 9 else None,
            taker_buy_quote=_structure_decimal(row[10], Decimal) if len(row) > 10 else None,
        )
        if open_ms % MS:
            raise WireError("bad_rest_row", f"open time {open_ms} is not whole seconds")
        validate_candle(candle, timeframe)
    except CandleError as exc:
        raise WireError("bad_rest_row", str(exc)) from None
    return candle


def decode_rest_klines(body: bytes, timeframe: Timeframe) -> list[Candle]:
    doc = decode_wire_json(body)
    if not isinstance(doc, list):
        raise WireError("bad_rest_body", f"expected a JSON array, got {type(doc).__name__}")
    return [candle_from_rest_row(row, timeframe) for row in doc]


def candle_to_rest_row(candle: Candle, timeframe: Timeframe) -> list[object]:
    """The inverse of :func:`candle_from_rest_row` (used by ``tradecanvas replay``)."""
    open_ms = candle.candle_time * MS
    return [
        open_ms,
        str(candle.open),
        str(candle.high),
        str(candle.low),
        str(candle.close),
        str(candle.volume),
        timeframe.next_open(candle.candle_time) * MS - 1,
        str(candle.quote_volume or 0),
        candle.trades or 0,
        str(candle.taker_buy_base or 0),
        str(candle.taker_buy_quote or 0),
        "0",
    ]


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
                "o": str(candle.open),
                "c": str(candle.close),
                "h": str(candle.high),
                "l": str(candle.low),
                "v": str(candle.volume),
                "n": candle.trades or 0,
                "x": closed,
                "q": str(candle.quote_volume or 0),
                "V": str(candle.taker_buy_base or 0),
                "Q": str(candle.taker_buy_quote or 0),
                "B": "0",
            },
        },
    }
