"""Identifiers, timeframes and the Candle (DESIGN §2). Plain data, no I/O."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Final, Literal

import attrs

from tradecanvas.errors import CandleError, SeriesIdError

# Time units. Candle times are unix seconds; Binance's are milliseconds.
MS: Final = 1000  # milliseconds in a second
MINUTE: Final = 60  # the base timeframe, in seconds
MINUTE_MS: Final = MINUTE * MS
DAY: Final = 86_400

EXCHANGES: Final = ("binance",)
MARKETS: Final = ("futures", "spot")
Market = Literal["futures", "spot"]

_TIMEFRAME_RE: Final = re.compile(r"^([1-9][0-9]{0,3})([mhd])$")
_UNIT_SECONDS: Final = {"m": MINUTE, "h": 60 * MINUTE, "d": DAY}
_SYMBOL_RE: Final = re.compile(r"^[A-Z0-9]{1,20}/[A-Z0-9]{1,20}(:[A-Z0-9]{1,20})?$")


@attrs.frozen(order=True)
class Timeframe:
    """A bar length such as ``1m``, ``5m``, ``4h``, ``1d``. Ordered by length."""

    seconds: int
    text: str = attrs.field(order=False)

    @classmethod
    def parse(cls, text: str) -> Timeframe:
        match = _TIMEFRAME_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise SeriesIdError(
                f"bad timeframe {text!r}: expected <n>m, <n>h or <n>d, such as 1m, 5m, 1h, 1d"
            )
        return cls(int(match.group(1)) * _UNIT_SECONDS[match.group(2)], text)

    def floor(self, t: int) -> int:
        """The open time of the bucket holding ``t`` (UTC-aligned)."""
        return t - t % self.seconds

    def __str__(self) -> str:
        return self.text


@attrs.frozen(order=True)
class SeriesId:
    """``{exchange}:{market}:{symbol}:{timeframe}``; the symbol may itself hold a ``:``."""

    exchange: str
    market: Market
    symbol: str
    timeframe: Timeframe

    @classmethod
    def parse(cls, text: object) -> SeriesId:
        if not isinstance(text, str) or not text:
            raise SeriesIdError(f"series_id must be a non-empty string, got {text!r}")
        parts = text.split(":")
        if len(parts) < 4:
            raise SeriesIdError(
                f"bad series_id {text!r}: expected exchange:market:symbol:timeframe,"
                " such as binance:futures:BTC/USDT:1m"
            )
        exchange, market, tf = parts[0], parts[1], parts[-1]
        symbol = ":".join(parts[2:-1])
        if exchange not in EXCHANGES:
            raise SeriesIdError(
                f"bad series_id {text!r}: unknown exchange {exchange!r}, allowed: binance"
            )
        if market not in MARKETS:
            raise SeriesIdError(
                f"bad series_id {text!r}: unknown market {market!r}, allowed: futures, spot"
            )
        if not _SYMBOL_RE.match(symbol):
            raise SeriesIdError(
                f"bad series_id {text!r}: bad symbol {symbol!r}, expected BASE/QUOTE or"
                " BASE/QUOTE:SETTLE in upper case, such as BTC/USDT"
            )
        try:
            timeframe = Timeframe.parse(tf)
        except SeriesIdError as exc:
            raise SeriesIdError(f"bad series_id {text!r}: {exc}") from None
        return cls(exchange, market, symbol, timeframe)  # type: ignore[arg-type]

    def with_timeframe(self, timeframe: Timeframe) -> SeriesId:
        return attrs.evolve(self, timeframe=timeframe)

    @property
    def stream_symbol(self) -> str:
        """Binance's lower-case symbol: ``BTC/USDT:USDT`` → ``btcusdt``."""
        return self.symbol.split(":")[0].replace("/", "").lower()

    @property
    def rest_symbol(self) -> str:
        return self.stream_symbol.upper()

    @property
    def stream_name(self) -> str:
        return f"{self.stream_symbol}@kline_{self.timeframe.text}"

    def __str__(self) -> str:
        return f"{self.exchange}:{self.market}:{self.symbol}:{self.timeframe.text}"


@attrs.frozen
class Candle:
    """One bar. ``candle_time`` is the OPEN time in unix seconds; prices are exact Decimals.

    The optional fields are known for Binance-sourced candles and summed for derived ones.
    Equality compares values numerically (``Decimal("1.0") == Decimal("1.00")``).
    """

    candle_time: int
    open: Decimal
    high: Decimal
    low: Decimal
    close: Decimal
    volume: Decimal
    quote_volume: Decimal | None = None
    trades: int | None = None
    taker_buy_base: Decimal | None = None
    taker_buy_quote: Decimal | None = None

    def same_values(self, other: Candle) -> bool:
        """True when OHLCV and every field both sides know are numerically equal."""
        if (self.candle_time, self.open, self.high, self.low, self.close, self.volume) != (
            other.candle_time,
            other.open,
            other.high,
            other.low,
            other.close,
            other.volume,
        ):
            return False
        for name in ("quote_volume", "trades", "taker_buy_base", "taker_buy_quote"):
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine is not None and theirs is not None and mine != theirs:
                return False
        return True

    def to_wire(self) -> dict[str, int | float]:
        """The subscriber/HTTP candle object: numbers as the nearest double."""
        return {
            "candle_time": self.candle_time,
            "open": float(self.open),
            "high": float(self.high),
            "low": float(self.low),
            "close": float(self.close),
            "volume": float(self.volume),
        }


def validate_candle(candle: Candle, timeframe: Timeframe) -> None:
    """Refuse a candle that cannot be a real bar of ``timeframe``. Raises CandleError."""
    t = candle.candle_time
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise CandleError(f"candle_time must be a non-negative integer of seconds, got {t!r}")
    if t % timeframe.seconds:
        raise CandleError(
            f"candle_time {t} is not aligned to {timeframe}: it must be a multiple of"
            f" {timeframe.seconds} (the bar's open time in seconds)"
        )
    for name in ("open", "high", "low", "close", "volume"):
        value = getattr(candle, name)
        if not value.is_finite():
            raise CandleError(f"{name} must be a finite number, got {value}")
    if candle.high < candle.low:
        raise CandleError(f"high {candle.high} is below low {candle.low} at {t}")
    for name in ("open", "close"):
        value = getattr(candle, name)
        if not candle.low <= value <= candle.high:
            raise CandleError(
                f"{name} {value} is outside [low {candle.low}, high {candle.high}] at {t}"
            )
    if candle.low < 0:
        raise CandleError(f"prices must not be negative, got low {candle.low} at {t}")
    if candle.volume < 0:
        raise CandleError(f"volume must not be negative, got {candle.volume} at {t}")
    for name in ("quote_volume", "taker_buy_base", "taker_buy_quote"):
        value = getattr(candle, name)
        if value is not None and (not value.is_finite() or value < 0):
            raise CandleError(f"{name} must not be negative, got {value} at {t}")
    if candle.trades is not None and candle.trades < 0:
        raise CandleError(f"trades must not be negative, got {candle.trades} at {t}")
