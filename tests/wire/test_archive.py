"""The archive parser and writer (``tradecanvas.wire.archive``): layouts, units, refusals."""

from __future__ import annotations

import io
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.errors import CandleError, WireError
from tradecanvas.model import BASE_TIMEFRAME, Candle, Timeframe, validate_candle
from tradecanvas.wire import kline_columns
from tradecanvas.wire.archive import (
    ARCHIVE_HEADER,
    _parse_plain,
    archive_lines,
    archive_timeframe,
    market_of_path,
    missing_runs,
    parse_archive_name,
    parse_archive_rows,
    parse_archive_text,
    split_symbol,
)

T0 = 1_577_836_800  # 2020-01-01 00:00 UTC
SPOT_ROW = (
    "1577836800000,7195.24000000,7196.25000000,7183.14000000,7186.68000000,51.64281200,"
    "1577836859999,371233.51835535,493,19.59823000,140888.41428273,0"
)


def row(t: int, *, unit: int = 1000, close: int | None = None, price: str = "1.5") -> str:
    close_time = (t + 60) * unit - 1 if close is None else close
    return f"{t * unit},{price},{price},{price},{price},2,{close_time},3,4,1,1.5,0"


def test_a_spot_row_without_header_reads_every_column() -> None:
    [candle] = parse_archive_rows([SPOT_ROW])
    assert candle == Candle(
        T0,
        Decimal("7195.24"),
        Decimal("7196.25"),
        Decimal("7183.14"),
        Decimal("7186.68"),
        Decimal("51.642812"),
        Decimal("371233.51835535"),
        493,
        Decimal("19.59823"),
        Decimal("140888.41428273"),
    )


def test_futures_header_and_microseconds_read_the_same_candles() -> None:
    ms = parse_archive_rows([row(T0), row(T0 + 60)])
    with_header = parse_archive_rows([ARCHIVE_HEADER, row(T0), row(T0 + 60)])
    micro = parse_archive_rows([row(T0, unit=1_000_000), row(T0 + 60, unit=1_000_000)])
    assert ms == with_header == micro
    assert [c.candle_time for c in ms] == [T0, T0 + 60]


def test_the_six_column_layout_with_header_is_read() -> None:
    [candle] = parse_archive_rows(["open_time,open,high,low,close,volume", f"{T0}000,1,2,1,2,5"])
    assert candle == Candle(T0, Decimal(1), Decimal(2), Decimal(1), Decimal(2), Decimal(5))
    assert candle.trades is None


@pytest.mark.parametrize(
    ("lines", "why"),
    [
        ([row(T0), "1577836860000,1,2,3"], "line 2: 4 columns where the file has 12"),
        ([row(T0), row(T0 + 60).replace("1.5", "x", 1)], "line 2: a field is not a number"),
        ([row(T0), row(T0)], "line 2: open time 1577836800000 is not after"),
        ([row(T0 + 60), row(T0)], "line 2: open time 1577836800000 is not after"),
        ([row(T0, close=T0 * 1000 + 299_999)], "line 1: close time 1577837099999 is not one"),
        ([f"{T0 * 1000 + 30_000},1,1,1,1,1,{T0 * 1000 + 89_999},1,1,1,1,0"], "not on a minute"),
        (["hello,world"], "line 1: not a kline header or row"),
        (["1,2,3"], "line 1: 3 columns; a kline row has 12"),
        ([row(T0), row(T0 + 60).replace(",4,", ",1.5,")], "line 2: trade count '1.5' is not an"),
        ([row(T0).replace("59999,", "59999.0,")], "line 1: close time '1577836859999.0' is not"),
    ],
)
def test_a_bad_row_is_refused_naming_its_line(lines: list[str], why: str) -> None:
    with pytest.raises(WireError, match="bad_archive_row") as caught:
        parse_archive_rows(lines)
    assert why in str(caught.value)


def test_a_non_integer_in_an_integer_column_is_named_by_the_whole_file_parse() -> None:
    """``tradecanvas import`` said a bare ``invalid literal for int() with base 10: '1.5'``."""
    text = "\n".join([row(T0), row(T0 + 60).replace(",4,", ",1.5,")]) + "\n"
    with pytest.raises(WireError) as caught:
        parse_archive_text(text)
    assert str(caught.value) == "bad_archive_row: line 2: trade count '1.5' is not an integer"


def test_a_row_outside_the_named_period_is_refused() -> None:
    name = parse_archive_name("BTCUSDT-1m-2020-01-01.zip")
    assert name is not None
    parse_archive_rows([row(T0 + 86_340)], span=(name.start, name.end))
    with pytest.raises(WireError, match="line 1: open time 1577923200000 is outside"):
        parse_archive_rows([row(T0 + 86_400)], span=(name.start, name.end))


def test_file_names_give_symbol_interval_and_period() -> None:
    daily = parse_archive_name("BTCUSDT-1m-2020-01-01.zip")
    monthly = parse_archive_name("ETHUSDT-1m-2024-02.csv")
    assert daily is not None and monthly is not None
    assert (daily.symbol, daily.interval, daily.start, daily.expected_rows) == (
        "BTCUSDT",
        "1m",
        T0,
        1440,
    )
    assert monthly.expected_rows == 29 * 1440  # 2024 is a leap year
    assert parse_archive_name("BTCUSDT-5m-2020-01-01.zip") is not None
    for bad in ("BTCUSDT-1m-2020-13-01.zip", "notes.csv", "BTCUSDT-1m-2020-01-01.txt"):
        assert parse_archive_name(bad) is None
    assert split_symbol("BTCUSDT") == "BTC/USDT"
    assert split_symbol("ETHFDUSD") == "ETH/FDUSD"
    assert split_symbol("XYZ") is None


def test_a_file_name_bounds_its_rows_and_bytes() -> None:
    def bound(name: str) -> tuple[int, int]:
        parsed = parse_archive_name(name)
        assert parsed is not None
        return parsed.max_rows, parsed.max_csv_bytes

    assert bound("BTCUSDT-1m-2020-01-01.zip") == (1440, 1440 * 512 + 4096)
    assert bound("BTCUSDT-1m-2020-01.zip") == (44_640, 44_640 * 512 + 4096)
    assert bound("BTCUSDT-1m-2020-02.zip")[0] == 29 * 1440
    assert bound("BTCUSDT-5m-2020-01-01.zip")[0] == 288
    assert bound("BTCUSDT-1s-2020-01-01.zip")[0] == 86_400
    assert bound("BTCUSDT-3d-2020-01.zip")[0] == 11  # 31 days hold at most 11 grid openings
    assert bound("BTCUSDT-1w-2020-01.zip")[0] == 5
    assert bound("BTCUSDT-1mo-2020-01.zip")[0] == 2  # a month is at least 28 days


@pytest.mark.parametrize(
    ("interval", "opens", "closes"),
    [
        ("5m", [T0, T0 + 300], [T0 + 300, T0 + 600]),
        ("1s", [T0, T0 + 1], [T0 + 1, T0 + 2]),
        ("1w", [T0 + 5 * 86_400], [T0 + 12 * 86_400]),  # Monday 2020-01-06
        ("1mo", [T0, T0 + 31 * 86_400], [T0 + 31 * 86_400, T0 + 60 * 86_400]),
        ("3d", [T0, T0 + 3 * 86_400], [T0 + 3 * 86_400, T0 + 6 * 86_400]),
    ],
)
def test_other_intervals_read_with_their_timeframe(
    interval: str, opens: list[int], closes: list[int]
) -> None:
    timeframe = archive_timeframe(interval)
    lines = [row(t, close=c * 1000 - 1) for t, c in zip(opens, closes, strict=True)]
    assert [c.candle_time for c in parse_archive_rows(lines, timeframe=timeframe)] == opens
    with pytest.raises(WireError, match=f"line 1: close time .* is not one {timeframe} bar after"):
        parse_archive_rows([row(opens[0])], timeframe=timeframe)  # a 1m bar
    if interval != "1s":
        with pytest.raises(WireError, match=f"line 1: open time .* is not on a {timeframe} bar"):
            parse_archive_rows(
                [row(opens[0] + 60, close=closes[0] * 1000 - 1)], timeframe=timeframe
            )
    with pytest.raises(WireError, match="wrong_interval"):
        archive_timeframe("7x")


def test_the_market_comes_from_the_nearest_folder() -> None:
    assert market_of_path(("data", "spot", "daily", "klines")) == "spot"
    assert market_of_path(("data", "futures", "um", "daily")) == "futures"
    assert market_of_path(("klines_1m_5m", "futures_um")) == "futures"
    assert market_of_path(("tmp", "x")) is None


def test_missing_runs() -> None:
    assert missing_runs([T0 + 60, T0 + 240], T0, T0 + 360) == [
        (T0, T0 + 60),
        (T0 + 120, T0 + 240),
        (T0 + 300, T0 + 360),
    ]
    assert missing_runs([], T0, T0 + 60) == [(T0, T0 + 60)]


def test_lines_of_a_derived_timeframe_close_at_its_end() -> None:
    candle = Candle(T0, Decimal(1), Decimal(1), Decimal(1), Decimal(1), Decimal(1))
    [line] = archive_lines([candle], timeframe=Timeframe.parse("5m"))
    assert line.split(",")[6] == str(T0 * 1000 + 299_999)


decimals = st.decimals(min_value=0, max_value=10**9, places=8, allow_nan=False)


@st.composite
def candles(draw: st.DrawFn) -> list[Candle]:
    minutes = sorted(draw(st.sets(st.integers(0, 5000), min_size=1, max_size=30)))
    result = []
    for m in minutes:
        prices = sorted(draw(st.lists(decimals, min_size=4, max_size=4)))
        low, a, b, high = prices
        extras = draw(st.booleans())
        result.append(
            Candle(
                T0 + 60 * m,
                a,
                high,
                low,
                b,
                draw(decimals),
                draw(decimals) if extras else None,
                draw(st.integers(0, 10**6)) if extras else None,
                draw(decimals) if extras else None,
                draw(decimals) if extras else None,
            )
        )
    return result


@given(candles(), st.booleans())
def test_reading_what_was_written_gives_the_same_candles(given: list[Candle], header: bool) -> None:
    back = parse_archive_rows(list(archive_lines(given, header=header)))
    assert back == given
    assert [str(c.open) for c in back] == [str(c.open) for c in given]  # the same text


# price texts that repeat, some numerically equal in another spelling, some refused
PRICE_TEXTS = (
    "0",
    "0.00",
    "1.5",
    "1.50",
    "1.5E0",
    "2",
    "2.00000000",
    "10",
    "1e1",
    "-1",
    "Inf",
    "NaN",
)
# a candle's decimal fields
FIELDS = tuple(f for f in kline_columns.FIELDS if f not in ("candle_time", "trades"))


@given(st.lists(st.tuples(*[st.sampled_from(PRICE_TEXTS)] * 4), min_size=1, max_size=20))
def test_repeated_price_texts_read_as_each_text_alone(prices: list[tuple[str, ...]]) -> None:
    """The parser builds a price's Decimal once per distinct text: the candles (values and
    text) and the refusals are those of a Decimal built for every field and checked by
    ``validate_candle``."""
    lines, expected, refusal = [], [], None
    for i, (o, h, lo, c) in enumerate(prices):
        t = T0 + 60 * i
        lines.append(f"{t * 1000},{o},{h},{lo},{c},2,{(t + 60) * 1000 - 1},3,4,1,1.5,0")
        op, hi, low, cl = (Decimal(x) for x in (o, h, lo, c))
        candle = Candle(
            t, op, hi, low, cl, Decimal("2"), Decimal("3"), 4, Decimal("1"), Decimal("1.5")
        )
        if refusal is None:
            try:
                validate_candle(candle, BASE_TIMEFRAME)
                expected.append(candle)
            except CandleError as exc:
                refusal = f"line {i + 1}: {exc}"
    if refusal is not None:
        with pytest.raises(WireError) as caught:
            parse_archive_rows(lines)
        assert caught.value.detail == refusal
    else:
        back = parse_archive_rows(lines)
        assert back == expected
        texts = [[str(getattr(c, f)) for f in FIELDS] for c in back]
        assert texts == [[str(getattr(c, f)) for f in FIELDS] for c in expected]


# fields of a row: plain numbers (the shorter loop's), and what only the row-by-row parser
# reads or refuses
PLAIN_PRICES = ("0", "0.00", "1.5", "1.50", "2", "2.00000000", "10")
FIELD_TEXTS = ("0", "1.5", "2", "2.00000000", "", "-1", "1e1", "NaN", " 3", "1_0", "1.2.3", "x")
# plain digits at and about the bounds (MAX_VALUE 1e30, MAX_TRADES 2**53): the row-by-row
# parser refuses the ones at or above, the shorter loop must too (a 1 and 400 zeros was read)
LARGE_TEXTS = (
    "9" * 30,
    "9" * 30 + ".99999999",
    "1" + "0" * 30,
    "1" + "0" * 30 + ".00000000",
    "1" + "0" * 400,
    "0" * 40 + "7.5",
)
LARGE_TRADES = (str(2**53), str(2**53 + 1), str(2**60), "0" * 20 + "5")


@st.composite
def archive_texts(draw: st.DrawFn) -> tuple[str, tuple[int, int] | None]:
    """A file's text, mostly plain rows (so that the shorter loop often reads it whole),
    with now and then what it must leave to the row-by-row parser."""
    unit = draw(st.sampled_from((1000, 1_000_000)))
    odd = draw(st.integers(0, 3)) == 0  # a quarter of the files get odd fields or rows
    lines = [ARCHIVE_HEADER] if draw(st.booleans()) else []
    t = T0 + 60 * draw(st.integers(0, 3))
    for _ in range(draw(st.integers(0, 6))):
        texts = st.sampled_from(PRICE_TEXTS[:9] if odd else PLAIN_PRICES)
        low, a, b, high = sorted(draw(st.lists(texts, min_size=4, max_size=4)), key=Decimal)
        fields = [str(t * unit), a, high, low, b, "2", str((t + 60) * unit - 1), "3", "4", "1"]
        fields += ["1.5", "0"]
        if odd and draw(st.booleans()):
            fields[draw(st.integers(1, 10))] = draw(st.sampled_from(FIELD_TEXTS))
        if draw(st.integers(0, 7)) == 0:  # a plain number about the bounds
            at = draw(st.sampled_from((2, 5, 7, 8, 9, 10)))
            fields[at] = draw(st.sampled_from(LARGE_TRADES if at == 8 else LARGE_TEXTS))
        if odd and draw(st.integers(0, 4)) == 0:
            fields = draw(st.sampled_from((fields[:6], fields[:11], [""], [*fields, "0"])))
        lines.append(",".join(fields))
        t += 60 * draw(st.sampled_from((1, 1, 1, 2, 0, -1) if odd else (1, 1, 2)))
    end = draw(st.sampled_from(("\n", "\r\n", ""))) if odd else "\n"
    span = draw(st.sampled_from((None, (T0, T0 + 86_400), (T0 + 120, T0 + 300))))
    return "".join(line + end for line in lines) if end else "\n".join(lines), span


@given(archive_texts())
def test_the_whole_text_reads_as_its_rows_one_by_one(
    file: tuple[str, tuple[int, int] | None],
) -> None:
    """``parse_archive_text`` (the shorter loop, and the row-by-row parser for the rest): the
    same candles, in the same text, or the same refusal as ``parse_archive_rows``."""
    text, span = file
    refusal: str | None = None
    try:
        expected = parse_archive_rows(io.StringIO(text), span=span)
    except WireError as exc:
        refusal = exc.detail
    if refusal is not None:
        with pytest.raises(WireError) as caught:
            parse_archive_text(text, span=span)
        assert caught.value.detail == refusal
        return
    back = parse_archive_text(text, span=span)
    assert back == expected
    texts = [[str(getattr(c, f)) for f in FIELDS] for c in back]
    assert texts == [[str(getattr(c, f)) for f in FIELDS] for c in expected]


@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("unit", [1000, 1_000_000])
def test_the_archive_own_form_takes_the_shorter_loop(header: bool, unit: int) -> None:
    """A file as Binance writes it (spot or USDⓈ-M, ms or µs) is read by the shorter loop."""
    text = "".join(archive_lines([c for c in parse_archive_rows([row(T0), row(T0 + 60)])],
                                 header=header))  # fmt: skip
    if unit != 1000:
        text = text.replace("000,", "000000,").replace("999,", "999999,")
    columns = _parse_plain(text, (T0, T0 + 86_400))
    assert columns is not None
    candles = columns.candles()
    assert candles == parse_archive_rows(io.StringIO(text))
    assert [c.candle_time for c in candles] == [T0, T0 + 60]


@given(archive_texts(), st.integers(1, 4))
def test_the_shorter_way_reads_the_same_in_chunks_of_any_size(
    file: tuple[str, tuple[int, int] | None], chunk: int
) -> None:
    """The shorter way reads a file a chunk of rows at a time: the candles (and whether it
    leaves the file to the row-by-row parser) do not depend on where the chunks end — a
    row repeated, out of order or after a hole just past a chunk's end included."""
    text, span = file
    whole = _parse_plain(text, span)
    assert _parse_plain(text, span, chunk=chunk) == whole
    if whole is not None:
        assert whole.candles() == parse_archive_rows(io.StringIO(text), span=span)


def test_a_file_longer_than_a_chunk_reads_as_its_rows() -> None:
    """Two chunks and more, holes inside and across them (the ascending check of a chunk
    with holes, the order check across chunks): the candles of the row-by-row parser."""
    minutes = [*range(0, 5000), *range(5003, 9000), 9100, *range(9101, 12000)]
    text = "".join(row(T0 + 60 * m) + "\n" for m in minutes)
    columns = _parse_plain(text, None)
    assert columns is not None
    candles = columns.candles()
    assert candles == parse_archive_rows(io.StringIO(text))
    assert [c.candle_time for c in candles] == [T0 + 60 * m for m in minutes]
    # a row repeated at the start of the second chunk: left to the row-by-row parser
    repeated = [*range(0, 4096), 4095, *range(4096, 5000)]
    text = "".join(row(T0 + 60 * m) + "\n" for m in repeated)
    assert _parse_plain(text, None) is None
    with pytest.raises(WireError, match=r"line 4097: .*not after the previous row"):
        parse_archive_text(text)


@pytest.mark.parametrize(
    ("column", "large", "below"),
    [
        (2, "1" + "0" * 30, "9" * 30),  # high (the other prices are at most it)
        (5, "1" + "0" * 400, "9" * 30 + ".99999999"),  # volume
        (7, "1" + "0" * 30 + ".0", "0" * 40 + "9" * 30),  # quote volume
        (8, str(2**60), str(2**53)),  # trades
        (8, str(2**53 + 1), "0" * 30 + str(2**53)),
        (9, "1" + "0" * 30, "9" * 30),  # taker buy base
        (10, "1" + "0" * 30, "9" * 30),  # taker buy quote
    ],
)
def test_a_plain_number_too_large_is_refused(column: int, large: str, below: str) -> None:
    """A row of digits only whose value is at or above 1e30 (trades above 2**53) is refused
    with the row-by-row parser's words, as ``1e999`` is: the shorter loop leaves the file to
    it. Just below the bound, the shorter loop reads it."""

    def text_with(value: str) -> str:
        rows = [row(T0 + 60 * i).split(",") for i in range(10)]
        rows[3][column] = value
        return "".join(",".join(fields) + "\n" for fields in rows)

    text = text_with(large)
    assert _parse_plain(text, None) is None
    with pytest.raises(WireError) as caught:
        parse_archive_text(text)
    assert caught.value.detail.startswith("line 4: ")
    assert " is too large" in caught.value.detail
    text = text_with(below)
    columns = _parse_plain(text, None)
    assert columns is not None
    assert columns.candles() == parse_archive_rows(io.StringIO(text))
