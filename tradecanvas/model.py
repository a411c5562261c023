"""Identifiers, timeframes and the Candle (DESIGN §2). Plain data, no I/O."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final, Literal

import attrs

from tradecanvas.errors import CandleError, SeriesIdError

# Time units. Candle times are unix seconds; Binance's are milliseconds.
MS: Final = 1000  # milliseconds in a second
MINUTE: Final = 60  # the base timeframe, in seconds
# a candle given as closed may close this much after this machine's clock says now (clocks
# differ); one closing later is refused (the HTTP write path, import)
CLOCK_SKEW_S: Final = 60
MINUTE_MS: Final = MINUTE * MS
DAY: Final = 86_400
# no real bar's price or volume comes near this: a value at or above it is refused (1e999 is
# a finite Decimal, but an infinite double: clients got "volume": null), and sums of a
# month's minutes stay far inside a double's range
MAX_VALUE: Final = Decimal("1e30")
MAX_TRADES: Final = 2**53  # (exact in a double, as clients' JSON numbers are)

EXCHANGES: Final = ("binance",)
MARKETS: Final = ("futures", "spot")
Market = Literal["futures", "spot"]

WEEK: Final = 7 * DAY
# 1970-01-01 was a Thursday: Binance's weeks open on Mondays, 4 days after the epoch
_WEEK_OFFSET: Final = 4 * DAY
# the nominal length of 1M, for ordering and spans only: its longest month
_MONTH_NOMINAL: Final = 31 * DAY

_TIMEFRAME_RE: Final = re.compile(r"^([1-9][0-9]{0,3})([mhdwM])$")
_UNIT_SECONDS: Final = {"m": MINUTE, "h": 60 * MINUTE, "d": DAY, "w": WEEK}
_SYMBOL_RE: Final = re.compile(r"^[A-Z0-9]{1,20}/[A-Z0-9]{1,20}(:[A-Z0-9]{1,20})?$")
# Binance's kline intervals above 1s (BINANCE.md)
BINANCE_INTERVALS: Final = (
    "1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d", "1w", "1M",
)  # fmt: skip


# the most of a bad input a message repeats (a 60 KB series_id came back three times)
SHOWN_MAX: Final = 80


def shown(value: object) -> str:
    """``repr(value)`` for an error message, cut to about :data:`SHOWN_MAX` characters (a
    longer one says how long it was)."""
    text = repr(value)
    if len(text) <= SHOWN_MAX:
        return text
    length = f" ({len(value)} characters)" if isinstance(value, str) else ""
    return f"{text[:SHOWN_MAX]}…{length}"


def _large(value: Decimal) -> str:
    """A number too large for a bar, written short when its digits are many (an archive's
    ``1`` and 400 zeros: ``1.000000E+400``)."""
    text = str(value)
    return text if len(text) <= 40 else f"{value:.6E}"


@attrs.frozen(order=True, cache_hash=True)
class Timeframe:
    """A bar length such as ``1m``, ``5m``, ``4h``, ``1d``, ``3d``, ``1w``, ``1M``, ordered by
    length, with the bucket arithmetic of Binance's own bars (BINANCE.md):

    - minutes, hours and ``1d``: open times are multiples of the length since the epoch;
    - ``1w``: Mondays 00:00 UTC; ``1M``: the 1st of the month 00:00 UTC;
    - multi-day lengths such as ``3d``: a grid of that many days whose *phase* (the open time
      of any one bar, modulo the length) is the symbol's own — Binance starts it at the
      symbol's first daily bar. Pass the phase in seconds; see :attr:`phased`.

    ``seconds`` is exact for every length but ``1M``, where it is the longest month (31 days):
    use :meth:`next_open` for the end of a bucket, never ``open + seconds``.
    """

    seconds: int
    text: str = attrs.field(order=False)

    @classmethod
    def parse(cls, text: str) -> Timeframe:
        match = _TIMEFRAME_RE.match(text) if isinstance(text, str) else None
        if match is None:
            seconds = isinstance(text, str) and text.endswith("s") and text[:-1].isdigit()
            raise SeriesIdError(
                f"bad timeframe {shown(text)}: expected <n>m, <n>h, <n>d, 1w or 1M, such as 1m, 5m,"
                " 1h, 1d, 1M (1M is a month, 1m a minute)"
                + (
                    "; seconds are finer than the 1m klines everything is built from"
                    if seconds
                    else ""
                )
            )
        count, unit = int(match.group(1)), match.group(2)
        if unit == "M":
            if count != 1:
                raise SeriesIdError(f"bad timeframe {shown(text)}: the only month length is 1M")
            return cls(_MONTH_NOMINAL, text)
        if unit == "w" and count != 1:
            raise SeriesIdError(f"bad timeframe {shown(text)}: the only week length is 1w")
        return cls(count * _UNIT_SECONDS[unit], text)

    @property
    def is_month(self) -> bool:
        return self.text == "1M"

    @property
    def is_week(self) -> bool:
        return self.text == "1w"

    @property
    def phased(self) -> bool:
        """A grid of several days (Binance's ``3d``): its phase is the symbol's own."""
        return not self.is_month and not self.is_week and self.seconds > DAY

    @property
    def fixed(self) -> bool:
        """Every bucket has the same length (all but ``1M``)."""
        return not self.is_month

    def same_bars(self, other: Timeframe) -> bool:
        """The same buckets under another name (``60m`` and ``1h``, ``72h`` and ``3d``); not
        ``7d`` and ``1w`` (epoch weeks start on Thursdays) nor ``31d`` and ``1M``."""
        return (self.seconds, self.is_week, self.is_month) == (
            other.seconds,
            other.is_week,
            other.is_month,
        )

    def floor(self, t: int, phase: int = 0) -> int:
        """The open time of the bucket holding ``t``; ``phase`` (seconds) only for
        :attr:`phased` lengths."""
        if self.is_month:
            moment = datetime.fromtimestamp(t, UTC)
            return int(datetime(moment.year, moment.month, 1, tzinfo=UTC).timestamp())
        if self.is_week:
            return t - (t - _WEEK_OFFSET) % WEEK
        if self.phased:
            return t - (t - phase) % self.seconds
        return t - t % self.seconds

    def next_open(self, open_time: int) -> int:
        """The open time of the bucket after the one opening at ``open_time``."""
        if self.is_month:
            moment = datetime.fromtimestamp(open_time, UTC)
            year, month = divmod(moment.year * 12 + moment.month, 12)
            return int(datetime(year, month + 1, 1, tzinfo=UTC).timestamp())
        return open_time + self.seconds

    def is_open_time(self, t: int, phase: int = 0) -> bool:
        return self.floor(t, phase) == t

    def minutes_in(self, open_time: int) -> int:
        """Base minutes in the bucket opening at ``open_time``."""
        return (self.next_open(open_time) - open_time) // MINUTE

    def nests_in(self, other: Timeframe) -> bool:
        """Every bucket of ``other`` is a whole number of buckets of ``self`` (for every
        phase): ``self`` can be summed into ``other``."""
        if self == other or self.is_month or self.seconds > other.seconds:
            return False
        if self.phased:
            return False  # its grid depends on the symbol; nothing is built from it
        if other.is_month or other.is_week or other.phased:
            return DAY % self.seconds == 0  # those open at midnight
        return other.seconds % self.seconds == 0

    def __str__(self) -> str:
        return self.text


BASE_TIMEFRAME: Final = Timeframe.parse("1m")


def derivation_sources(derived: Iterable[Timeframe]) -> Mapping[Timeframe, Timeframe]:
    """For each derived timeframe, the one it is summed from: the longest of 1m and the
    shorter derived timeframes that nests in it (:meth:`Timeframe.nests_in`)."""
    ordered = sorted(set(derived))
    sources: dict[Timeframe, Timeframe] = {}
    for index, tf in enumerate(ordered):
        candidates = [BASE_TIMEFRAME, *(s for s in ordered[:index] if s.nests_in(tf))]
        sources[tf] = max(candidates, key=lambda s: s.seconds)
    return sources


# cache_hash: a series id keys most of the ingest loop's dicts, looked up several times
# per frame (its hash, of four fields with a Timeframe among them, cost 0.5 µs a time)
@attrs.frozen(order=True, cache_hash=True)
class SeriesId:
    """``{exchange}:{market}:{symbol}:{timeframe}``; the symbol may itself hold a ``:``."""

    exchange: str
    market: Market
    symbol: str
    timeframe: Timeframe

    @classmethod
    def parse(cls, text: object) -> SeriesId:
        if not isinstance(text, str) or not text:
            raise SeriesIdError(f"series_id must be a non-empty string, got {shown(text)}")
        parts = text.split(":")
        if len(parts) < 4:
            raise SeriesIdError(
                f"bad series_id {shown(text)}: expected exchange:market:symbol:timeframe,"
                " such as binance:futures:BTC/USDT:1m"
            )
        exchange, market, tf = parts[0], parts[1], parts[-1]
        symbol = ":".join(parts[2:-1])
        if exchange not in EXCHANGES:
            raise SeriesIdError(
                f"bad series_id {shown(text)}: unknown exchange {shown(exchange)}, allowed: binance"
            )
        if market not in MARKETS:
            raise SeriesIdError(
                f"bad series_id {shown(text)}: unknown market {shown(market)}, allowed: futures,"
                " spot"
            )
        if not _SYMBOL_RE.match(symbol):
            raise SeriesIdError(
                f"bad series_id {shown(text)}: bad symbol {shown(symbol)}, expected BASE/QUOTE or"
                " BASE/QUOTE:SETTLE in upper case, such as BTC/USDT"
            )
        try:
            timeframe = Timeframe.parse(tf)
        except SeriesIdError as exc:
            raise SeriesIdError(f"bad series_id {shown(text)}: {exc}") from None
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
    """Refuse a candle that cannot be a real bar of ``timeframe``. Raises CandleError with
    the first of its :func:`candle_problems`."""
    problems = candle_problems(candle, timeframe)
    if problems:
        raise CandleError(problems[0][1])


def candle_time_problem(t: object, timeframe: Timeframe) -> str | None:
    """Why ``t`` cannot be the ``candle_time`` of a ``timeframe`` bar; None when it can."""
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        return f"candle_time must be a non-negative integer of seconds, got {t!r}"
    if not timeframe.phased and not timeframe.is_open_time(t):
        return (
            f"candle_time {t} is not aligned to {timeframe}: it must be the open time of a"
            f" {timeframe} bar in seconds (such as {timeframe.floor(t)})"
        )
    return None


def candle_problems(candle: Candle, timeframe: Timeframe) -> list[tuple[str, str]]:
    """Every reason ``candle`` cannot be a real bar of ``timeframe``, each as (the field it
    is about, the message); empty when it can."""
    t = candle.candle_time
    wrong_time = candle_time_problem(t, timeframe)
    problems = [] if wrong_time is None else [("candle_time", wrong_time)]
    finite = True
    for name in ("open", "high", "low", "close", "volume"):
        value = getattr(candle, name)
        if not value.is_finite():
            problems.append((name, f"{name} must be a finite number, got {value}"))
            finite = False
    if not finite:
        return problems  # a NaN cannot be compared
    for name in ("open", "high", "low", "close", "volume"):
        value = getattr(candle, name)
        if abs(value) >= MAX_VALUE:
            problems.append(
                (name, f"{name} {_large(value)} is too large (a real bar's are below 1e30)")
            )
    if candle.high < candle.low:
        problems.append(("high", f"high {candle.high} is below low {candle.low} at {t}"))
    else:
        for name in ("open", "close"):
            value = getattr(candle, name)
            if not candle.low <= value <= candle.high:
                bounds = f"[low {candle.low}, high {candle.high}]"
                problems.append((name, f"{name} {value} is outside {bounds} at {t}"))
    if candle.low < 0:
        problems.append(("low", f"prices must not be negative, got low {candle.low} at {t}"))
    if candle.volume < 0:
        problems.append(("volume", f"volume must not be negative, got {candle.volume} at {t}"))
    for name in ("quote_volume", "taker_buy_base", "taker_buy_quote"):
        value = getattr(candle, name)
        if value is not None and (not value.is_finite() or value < 0):
            problems.append((name, f"{name} must not be negative, got {value} at {t}"))
        elif value is not None and value >= MAX_VALUE:
            problems.append(
                (name, f"{name} {_large(value)} is too large (a real bar's are below 1e30)")
            )
    if candle.trades is not None and candle.trades < 0:
        problems.append(("trades", f"trades must not be negative, got {candle.trades} at {t}"))
    elif candle.trades is not None and candle.trades > MAX_TRADES:
        problems.append(("trades", f"trades {candle.trades} is too large at {t}"))
    return problems


# Decimal against Decimal: about a quarter cheaper than against the int 0 (same answers)
_ZERO: Final = Decimal(0)


def plainly_valid(c: Candle) -> bool:
    """The checks of :func:`validate_candle` on a candle's values (not its time), in one
    expression: True only when they would pass (False: let ``validate_candle`` say why). A
    NaN compares by raising, which counts as False."""
    try:
        return (
            c.high < MAX_VALUE
            and c.volume < MAX_VALUE
            and _ZERO <= c.low <= c.open <= c.high
            and c.low <= c.close <= c.high
            and c.volume >= _ZERO
            and (c.trades is None or 0 <= c.trades <= MAX_TRADES)
            # (the extras one by one: a generator per candle cost a fifth of the check)
            and ((q := c.quote_volume) is None or _ZERO <= q < MAX_VALUE)
            and ((b := c.taker_buy_base) is None or _ZERO <= b < MAX_VALUE)
            and ((bq := c.taker_buy_quote) is None or _ZERO <= bq < MAX_VALUE)
        )
    except ArithmeticError:
        return False
