"""Binance's REST ``klines`` rows ↔ Candle (BINANCE.md), with the value rules of the kline
frames (:mod:`~tradecanvas.wire.binance`). Anything malformed raises
:class:`~tradecanvas.errors.WireError` (``bad_rest_row``, ``bad_rest_body``, ``not_json``,
``bad_decimal``, ``bad_integer``).
"""

from __future__ import annotations

from decimal import Decimal

from tradecanvas.errors import CandleError, WireError
from tradecanvas.model import MS, Candle, Timeframe, validate_candle
from tradecanvas.wire.binance import decode_wire_json, plain, structure_decimal, structure_int


def candle_from_rest_row(row: object, timeframe: Timeframe) -> Candle:
    """One REST ``klines`` row ``[openTime, o, h, l, c, v, closeTime, q, n, V, Q, ignore]``."""
    if not isinstance(row, list) or len(row) < 6:
        raise WireError("bad_rest_row", f"expected a list of 12 fields, got {row!r:.120}")
    try:
        open_ms = structure_int(row[0], int)
        candle = Candle(
            candle_time=open_ms // MS,
            open=structure_decimal(row[1], Decimal),
            high=structure_decimal(row[2], Decimal),
            low=structure_decimal(row[3], Decimal),
            close=structure_decimal(row[4], Decimal),
            volume=structure_decimal(row[5], Decimal),
            quote_volume=structure_decimal(row[7], Decimal) if len(row) > 7 else None,
            trades=structure_int(row[8], int) if len(row) > 8 else None,
            taker_buy_base=structure_decimal(row[9], Decimal) if len(row) > 9 else None,
            taker_buy_quote=structure_decimal(row[10], Decimal) if len(row) > 10 else None,
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
        plain(candle.open),
        plain(candle.high),
        plain(candle.low),
        plain(candle.close),
        plain(candle.volume),
        timeframe.next_open(candle.candle_time) * MS - 1,
        plain(candle.quote_volume or 0),
        candle.trades or 0,
        plain(candle.taker_buy_base or 0),
        plain(candle.taker_buy_quote or 0),
        "0",
    ]
