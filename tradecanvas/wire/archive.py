"""Binance's public kline archive (``data.binance.vision``) as plain data: file names, rows,
and the CSV text ``tradecanvas export`` writes (DESIGN §8). Pure: no I/O, no trio.

A file holds one symbol's klines of one interval for a day or a month:
``SYMBOL-INTERVAL-YYYY-MM-DD.csv`` (daily) or ``SYMBOL-INTERVAL-YYYY-MM.csv`` (monthly), each
zipped beside a ``.CHECKSUM`` (its SHA-256). A row has 12 columns: ``open_time, open, high, low,
close, volume, close_time, quote_volume, trades, taker_buy_base, taker_buy_quote, ignore``.
Spot files have no header; USDⓈ-M futures files start with one
(``open_time,open,high,low,close,volume,close_time,quote_volume,count,…``). Times are
milliseconds, except spot files from 2025 on, which are microseconds. The 6-column
``open_time,open,high,low,close,volume`` layout (with its header, ms) is read too.

Only 1m klines are imported (the base series; the store derives the rest): a row whose
``close_time`` is not one minute after its ``open_time`` less one unit, or whose open time is
not on a minute, is for another interval and refused. ``fetch-archive --csv`` reads the
other intervals' files through the same parser (``timeframe``).

A file can hold only so many rows (:attr:`ArchiveName.max_rows`: 1,440 in a daily 1m file,
at most 44,640 in a monthly one), each short (Binance's are about 140 bytes), so its size
is bounded (:attr:`ArchiveName.max_csv_bytes`): the readers of a zip refuse a member that
declares or inflates to more (a zip bomb).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal, InvalidOperation
from itertools import islice, repeat
from operator import floordiv, le, lt, mod, sub
from typing import Final, cast

import attrs

from tradecanvas.errors import SeriesIdError, WireError
from tradecanvas.model import (
    BASE_TIMEFRAME,
    DAY,
    MAX_TRADES,
    MAX_VALUE,
    MINUTE,
    MS,
    WEEK,
    Candle,
    Market,
    SeriesId,
    Timeframe,
    plainly_valid,
    validate_candle,
)
from tradecanvas.wire.kline_columns import KlineColumns

# the header Binance's USDⓈ-M files carry (spot files have none)
ARCHIVE_HEADER: Final = (
    "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    "taker_buy_volume,taker_buy_quote_volume,ignore"
)
ARCHIVE_COLUMNS: Final = 12
OHLCV_COLUMNS: Final = 6
# a timestamp above this is in microseconds (spot files from 2025 on); ms reach it in 33658
US_THRESHOLD: Final = 10**15
US: Final = 1_000_000
HEADER_NAMES: Final = frozenset({"open_time", "open time", "timestamp"})  # a header's first field
INTEGER_COLUMNS: Final = {0: "open time", 6: "close time", 8: "trade count"}  # (by index)
# the characters of a plain archive file's rows: digits, the decimal point, the commas and
# the line ends (no sign, exponent, NaN, infinity, space or ``\r``)
_PLAIN: Final = b"0123456789.,\n"
_CHUNK: Final = 4096  # rows of a plain file converted at a time (see _plain_chunk)
# quote assets, longest match first where one ends another (FDUSD before USD…)
KNOWN_QUOTES: Final = (
    "FDUSD", "USDT", "USDC", "BUSD", "TUSD", "BTC", "ETH", "BNB", "EUR", "TRY",
)  # fmt: skip
# the bound on a row's length in bytes (Binance's longest are about 150: twelve numbers)
MAX_ROW_BYTES: Final = 512
SLACK_BYTES: Final = 4096  # besides the rows: a header line, a last line end
# the shortest bar of each interval unit (a month: February's 28 days)
_INTERVAL_UNIT_S: Final = {
    "s": 1, "m": MINUTE, "h": 60 * MINUTE, "d": DAY, "w": WEEK, "mo": 28 * DAY, "M": 28 * DAY,
}  # fmt: skip
_INTERVAL_RE: Final = re.compile(r"^([0-9]{1,2})(s|m|h|d|w|mo|M)$")
_NAME_RE: Final = re.compile(
    r"^(?P<symbol>[A-Z0-9]{2,30})-(?P<interval>[0-9]{1,2}(?:s|m|h|d|w|mo|M))-"
    r"(?P<year>[0-9]{4})-(?P<month>[0-9]{2})(?:-(?P<day>[0-9]{2}))?\.(?:zip|csv)$"
)


@attrs.frozen
class ArchiveName:
    """What a file's name says: Binance's symbol, the interval, and the day or month held
    (``[start, end)`` in unix seconds)."""

    symbol: str
    interval: str
    start: int
    end: int

    @property
    def daily(self) -> bool:
        return self.end - self.start == DAY

    @property
    def expected_rows(self) -> int:
        """Rows of a full 1m file (Binance's own holes make some shorter)."""
        return (self.end - self.start) // MINUTE

    @property
    def max_rows(self) -> int:
        """The most rows a file of its interval and period can hold (one per bar opening in
        it): 1,440 a day of 1m, 44,640 a 31-day month."""
        return -(-(self.end - self.start) // interval_seconds(self.interval))

    @property
    def max_csv_bytes(self) -> int:
        """The bound on the size of its CSV: :attr:`max_rows` rows of at most
        :data:`MAX_ROW_BYTES`, and :data:`SLACK_BYTES` (737,280 + 4,096 a daily 1m file)."""
        return self.max_rows * MAX_ROW_BYTES + SLACK_BYTES


def interval_seconds(interval: str) -> int:
    """The shortest bar of a Binance interval such as ``1m``, ``1d`` or ``1mo`` (a month: 28
    days), in seconds; 1 for a text that is no interval."""
    match = _INTERVAL_RE.match(interval)
    if match is None:
        return 1
    return max(1, int(match[1])) * _INTERVAL_UNIT_S[match[2]]


def archive_timeframe(interval: str) -> Timeframe:
    """The bars of a Binance interval as a :class:`Timeframe` (``1mo`` is ``1M``; seconds,
    which the store never holds, a Timeframe of that many seconds). Raises WireError
    ``wrong_interval`` for a text that is no interval."""
    match = _INTERVAL_RE.match(interval)
    try:
        if match is None:
            raise SeriesIdError(f"{interval!r} is not a kline interval")
        count, unit = int(match[1]), match[2]
        if unit == "s" and count:
            return Timeframe(count, interval)
        return Timeframe.parse("1M" if unit == "mo" else interval)
    except SeriesIdError as exc:
        raise WireError("wrong_interval", str(exc)) from None


def parse_archive_name(name: str) -> ArchiveName | None:
    """``BTCUSDT-1m-2020-01-01.zip`` → its parts; None when the name is not in that layout."""
    match = _NAME_RE.match(name)
    if match is None:
        return None
    year, month = int(match["year"]), int(match["month"])
    try:
        if match["day"] is not None:
            first = date(year, month, int(match["day"]))
            start = _midnight(first)
            end = start + DAY
        else:
            first = date(year, month, 1)
            start = _midnight(first)
            after = date(year + month // 12, month % 12 + 1, 1)
            end = _midnight(after)
    except ValueError:
        return None
    return ArchiveName(match["symbol"], match["interval"], start, end)


def _midnight(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def split_symbol(symbol: str) -> str | None:
    """Binance's ``BTCUSDT`` → ``BTC/USDT``; None when no known quote asset ends it."""
    for quote in KNOWN_QUOTES:
        if symbol.endswith(quote) and len(symbol) > len(quote):
            return f"{symbol[: -len(quote)]}/{quote}"
    return None


def series_for(name: ArchiveName, market: Market) -> SeriesId:
    """The base series a file's name stands for; raises WireError when it cannot."""
    if name.interval != "1m":
        raise WireError(
            "wrong_interval",
            f"holds {name.interval} klines; only 1m is imported (the store derives the rest)",
        )
    symbol = split_symbol(name.symbol)
    if symbol is None:
        raise WireError(
            "unknown_symbol",
            f"cannot split {name.symbol} into base and quote; give --series",
        )
    try:
        return SeriesId.parse(f"binance:{market}:{symbol}:1m")
    except SeriesIdError as exc:
        raise WireError("unknown_symbol", str(exc)) from None


def market_of_path(parts: Sequence[str]) -> Market | None:
    """``spot`` or ``futures`` from a path's folders (the archive's ``data/spot/…`` and
    ``data/futures/um/…``), the nearest first; None when none says."""
    for part in reversed(parts):
        lowered = part.lower()
        if lowered == "spot" or lowered.startswith("spot_"):
            return "spot"
        if lowered in ("futures", "um") or lowered.startswith(("futures_", "um_")):
            return "futures"
    return None


def _unit_of(text: str) -> int:
    return US if int(text) >= US_THRESHOLD else MS


def _first_row(row: list[str]) -> tuple[int, int]:
    """The layout (column count) and time unit of a file, from its first row."""
    width = len(row)
    if width not in (ARCHIVE_COLUMNS, OHLCV_COLUMNS):
        raise ValueError(f"{width} columns; a kline row has {ARCHIVE_COLUMNS} (or {OHLCV_COLUMNS})")
    return width, _unit_of(row[0])


class _Decimals(dict[str, Decimal]):
    """Each text's Decimal, built once: a file's prices repeat (a minute mostly opens at the
    last one's close, and its high or low is often one of those), and a Decimal shared is
    the same as one built again (they are immutable)."""

    __slots__ = ()

    def __missing__(self, text: str) -> Decimal:
        value = self[text] = Decimal(text)
        return value


def parse_archive_rows(
    lines: Iterable[str],
    *,
    span: tuple[int, int] | None = None,
    timeframe: Timeframe = BASE_TIMEFRAME,
) -> list[Candle]:
    """The 1m candles of one archive file's lines, in file order (ascending, each minute once).

    ``span``: the ``[start, end)`` its name says it holds; a row outside it is refused.
    ``timeframe``: the klines of another interval instead (``fetch-archive --csv``; a 3d
    bar's open time is checked to be on a day, its grid being the symbol's own).
    Raises WireError ``bad_archive_row`` with ``line N: why`` for the first bad row (wrong
    column count, a field that is not a number, not a 1m kline, out of order or repeated, a
    candle the store refuses such as high below low).
    """
    candles: list[Candle] = []
    append = candles.append
    previous = -1
    unit = width = number = step = 0
    # the bars of an interval that are not multiples of its length since the epoch
    uneven = timeframe.is_month or timeframe.is_week or timeframe.phased
    bar = "minute" if timeframe == BASE_TIMEFRAME else f"{timeframe} bar"
    low, high = span if span is not None else (0, 2**62)
    dec = Decimal
    # the four prices through a cache (they repeat); the volumes seldom do
    price = _Decimals()
    try:
        for number, line in enumerate(lines, start=1):
            row = line.rstrip("\r\n").split(",")
            if not width:
                if row == [""]:
                    continue
                if number == 1 and not row[0].strip().isdigit():
                    if row[0].strip().lower() not in HEADER_NAMES:
                        raise ValueError(f"not a kline header or row: {line[:80]!r}")
                    continue
                width, unit = _first_row(row)
                step = unit * timeframe.seconds
            if len(row) != width:
                if row == [""]:
                    continue
                raise ValueError(f"{len(row)} columns where the file has {width}")
            ticks = int(row[0])
            t = ticks // unit
            if _off_grid(ticks, t, unit, timeframe) if uneven else ticks % step:
                raise ValueError(f"open time {row[0]} is not on a {bar} (not a {timeframe} kline)")
            if t <= previous:
                raise ValueError(
                    f"open time {row[0]} is not after the previous row's (repeated or out of order)"
                )
            previous = t
            if not low <= t < high:
                raise ValueError(f"open time {row[0]} is outside the period the file name gives")
            if width == ARCHIVE_COLUMNS:
                _, o, h, lo, c, v, close, q, n, b, bq, _ = row
                closes = timeframe.next_open(t) * unit if uneven else ticks + step
                if int(close) != closes - 1:
                    raise ValueError(
                        f"close time {close} is not one {bar} after open time {row[0]}"
                        f" (not a {timeframe} kline)"
                    )
                candle = Candle(
                    t,
                    price[o],
                    price[h],
                    price[lo],
                    price[c],
                    dec(v),
                    dec(q) if q else None,
                    int(n) if n else None,
                    dec(b) if b else None,
                    dec(bq) if bq else None,
                )
            else:
                _, o, h, lo, c, v = row
                candle = Candle(t, price[o], price[h], price[lo], price[c], dec(v))
            if not plainly_valid(candle):
                validate_candle(candle, timeframe)
            append(candle)
    except (ValueError, InvalidOperation) as exc:
        why = "a field is not a number" if isinstance(exc, InvalidOperation) else str(exc)
        if why.startswith("invalid literal for int()"):  # name the column ('…: '1.5'')
            text = why.rsplit(": ", 1)[-1]
            names = [n for i, n in INTEGER_COLUMNS.items() if i < len(row) and repr(row[i]) == text]
            why = f"{(names or ['a column'])[0]} {text} is not an integer"
        raise WireError("bad_archive_row", f"line {number}: {why}") from None
    return candles


def _off_grid(ticks: int, t: int, unit: int, timeframe: Timeframe) -> bool:
    """An open time (``ticks`` in the file's unit, ``t`` in seconds) that no bar of a month,
    a week or a grid of days opens at (a grid's phase is the symbol's: only the day is
    checked)."""
    if ticks % unit:
        return True
    return bool(t % DAY) if timeframe.phased else not timeframe.is_open_time(t)


def parse_archive_text(text: str, *, span: tuple[int, int] | None = None) -> list[Candle]:
    """The 1m candles of one archive file's whole text: :func:`parse_archive_rows` of its
    lines, the same candles and the same refusals (:func:`parse_archive_columns`, a
    ``Candle`` a row)."""
    return parse_archive_columns(text, span=span).candles()


def parse_archive_columns(text: str, *, span: tuple[int, int] | None = None) -> KlineColumns:
    """:func:`parse_archive_text`'s candles as columns. A file in the archive's own form (12
    columns, every field a plain unsigned number, ``\\n`` line ends, at most the header line
    besides) goes a shorter way first, column by column (:func:`_parse_plain`; a fifth
    fewer instructions than the rows one by one, and no ``Candle`` a row: docs/benchmarks.md,
    Import); anything else, or anything that way would have to refuse, is read again by
    :func:`parse_archive_rows`, which says why."""
    plain = _parse_plain(text, span)
    if plain is not None:
        return plain
    return KlineColumns.of_candles(parse_archive_rows(io.StringIO(text), span=span))


def _parse_plain(
    text: str, span: tuple[int, int] | None, *, chunk: int = _CHUNK
) -> KlineColumns | None:
    """:func:`parse_archive_text`'s shorter way; None: read it row by row instead.

    Only digits, points and commas in the rows mean every number is finite and not
    negative, so :func:`~tradecanvas.model.plainly_valid` comes down to low ≤ open, close ≤
    high and the bounds (each value below :data:`~tradecanvas.model.MAX_VALUE`, the trades
    at most :data:`~tradecanvas.model.MAX_TRADES`: a ``1`` and 400 zeros is digits too);
    ``int`` and ``Decimal`` refuse the rest of what is not a number (an empty field,
    ``1.2.3``), and a row of another width the count of its commas. The rows go by column,
    ``chunk`` rows at a time (see :func:`_plain_chunk`)."""
    if not text[:1].isdigit():
        first, _, text = text.partition("\n")
        if first.split(",", 1)[0].strip().lower() not in HEADER_NAMES:
            return None
    if not text.isascii() or text.encode("ascii").translate(None, _PLAIN):
        return None
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    count = len(lines)
    commas = ARCHIVE_COLUMNS - 1
    if not count or list(map(str.count, lines, repeat(",", count))).count(commas) != count:
        return None
    low, high = span if span is not None else (0, 2**62)
    columns = KlineColumns.empty()
    price = _Decimals()
    previous = -1
    try:
        unit = _unit_of(lines[0].split(",", 1)[0])
        for at in range(0, count, chunk):
            part = _plain_chunk(lines[at : at + chunk], unit, previous, price)
            if part is None:
                return None
            columns.extend(part)
            previous = part.times[-1]
    except (ValueError, ArithmeticError):  # a field not a number
        return None
    if columns.times[0] < low or previous >= high:
        return None
    return columns


def _plain_chunk(
    lines: list[str], unit: int, previous: int, price: _Decimals
) -> KlineColumns | None:
    """The candles of plain 12-column ``lines`` (at least one) after the open time
    ``previous``; None when one is not a 1m kline after it, low ≤ open, close ≤ high fails
    or a value is too large (the row-by-row parser says which).

    Each column is converted by one ``map`` (C loops: no Python per field). In chunks, not
    a file at once: a ``map`` of ``Decimal`` holds the GIL throughout, and the commit's
    thread waits for it after each statement (a chunk's column is about a millisecond)."""
    count = len(lines)
    fields = ",".join(lines).split(",")
    ticks = list(map(int, fields[0::ARCHIVE_COLUMNS]))
    step = unit * MINUTE
    first = ticks[0]
    times: list[int]
    if not first % step and ticks == list(range(first, first + count * step, step)):
        # the usual chunk: every minute, once, in order (no Python per row)
        times = list(range(first // unit, first // unit + count * MINUTE, MINUTE))
    elif any(map(mod, ticks, repeat(step, count))):
        return None  # an open time not on a minute
    else:
        times = list(map(floordiv, ticks, repeat(unit, count)))
        if not all(map(lt, times, islice(times, 1, None))):
            return None  # repeated or out of order
    if times[0] <= previous:
        return None
    closes = list(map(sub, map(int, fields[6::ARCHIVE_COLUMNS]), ticks))
    if closes.count(step - 1) != count:
        return None  # not one minute after its open time
    get = price.__getitem__
    o, h, lo, c = (list(map(get, fields[i::ARCHIVE_COLUMNS])) for i in (1, 2, 3, 4))
    if not (all(map(le, lo, o)) and all(map(le, o, h)) and all(map(le, lo, c))
            and all(map(le, c, h)) and max(h) < MAX_VALUE):  # fmt: skip
        return None
    v, q, b, bq = (list(map(Decimal, fields[i::ARCHIVE_COLUMNS])) for i in (5, 7, 9, 10))
    trades = list(map(int, fields[8::ARCHIVE_COLUMNS]))
    # (a column's max is a C loop: the five add a few per cent to the chunk)
    if max(trades) > MAX_TRADES or max(map(max, (v, q, b, bq))) >= MAX_VALUE:
        return None
    # (the extras are known here: no None in them)
    extras = cast("list[Decimal | None]", q), cast("list[int | None]", trades)
    takers = cast("tuple[list[Decimal | None], ...]", (b, bq))
    return KlineColumns(times, o, h, lo, c, v, *extras, *takers)


def _text(value: Decimal | int | None) -> str:
    """A column as the archive writes it: plain digits, never an exponent (``str`` of a
    Decimal gives ``0E-8`` for ``0.00000000`` and ``6.0E-7`` for ``0.00000060``)."""
    if value is None:
        return ""
    return format(value, "f") if isinstance(value, Decimal) else str(value)


def archive_lines(
    candles: Iterable[Candle], *, timeframe: Timeframe = BASE_TIMEFRAME, header: bool = False
) -> Iterator[str]:
    """The archive's 12-column CSV lines (``\\n``-terminated, times in ms) for candles of
    ``timeframe``: for 1m, what :func:`parse_archive_rows` reads back as the same candles.
    Extras the candle lacks are left empty (read back as unknown)."""
    if header:
        yield ARCHIVE_HEADER + "\n"
    for c in candles:
        ms = c.candle_time * MS
        close_ms = timeframe.next_open(c.candle_time) * MS - 1
        yield (
            f"{ms},{c.open:f},{c.high:f},{c.low:f},{c.close:f},{c.volume:f},{close_ms},"
            f"{_text(c.quote_volume)},{_text(c.trades)},"
            f"{_text(c.taker_buy_base)},{_text(c.taker_buy_quote)},0\n"
        )


def missing_runs(times: Sequence[int], start: int, end: int) -> list[tuple[int, int]]:
    """The minutes of ``[start, end)`` absent from ascending ``times``, as ``[from, to)`` runs."""
    runs: list[tuple[int, int]] = []
    expected = start
    for t in times:
        if t > expected:
            runs.append((expected, t))
        expected = max(expected, t + MINUTE)
    if expected < end:
        runs.append((expected, end))
    return runs


__all__ = [
    "ARCHIVE_COLUMNS",
    "ARCHIVE_HEADER",
    "HEADER_NAMES",
    "MAX_ROW_BYTES",
    "SLACK_BYTES",
    "ArchiveName",
    "archive_lines",
    "archive_timeframe",
    "interval_seconds",
    "market_of_path",
    "missing_runs",
    "parse_archive_columns",
    "parse_archive_name",
    "parse_archive_rows",
    "parse_archive_text",
    "plainly_valid",
    "series_for",
    "split_symbol",
]
