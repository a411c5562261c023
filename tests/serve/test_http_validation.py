"""Validation of HTTP API requests without a server: the write body, the candle query and the
bearer token, each refusal naming every problem (DESIGN §5)."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
from starlette.datastructures import QueryParams

from tradecanvas.errors import ClientMessageError
from tradecanvas.model import CLOCK_SKEW_S, Candle, SeriesId
from tradecanvas.serve.http_validation import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    CandlesQuery,
    RequestRefused,
    check_bearer,
    parse_candle_time,
    parse_candles_query,
    parse_decimal,
    parse_events_query,
    parse_ingest_body,
)
from tradecanvas.serve.ws_protocol import MAX_EVENT_ID, parse_client_message

BTC: Final = "binance:futures:BTC/USDT:1m"
BTC5: Final = "binance:futures:BTC/USDT:5m"
ETH: Final = "binance:spot:ETH/USDT:1m"
T0: Final = 1_751_760_000  # 2025-07-06 00:00 UTC, aligned to 5m
TOKEN: Final = "test-ingest-token-0123456789abcdef"
# what tests/serve/test_http_api.py's daemon serves: BTC and ETH, each with 5m derived
WRITABLE: Final = frozenset(SeriesId.parse(s) for s in (BTC, ETH))
NOW: Final = T0 + 86_400.5  # the daemon's wall clock: a day after T0
SERVED: Final = WRITABLE | frozenset(SeriesId.parse(s) for s in (BTC5, "binance:spot:ETH/USDT:5m"))


def body_for(t: object = T0, series_id: object = BTC, **overrides: object) -> dict[str, Any]:
    c: dict[str, Any] = {
        "candle_time": t,
        "open": "100.5",
        "high": "101",
        "low": "99.25",
        "close": "100",
        "volume": "12.5",
    }
    c.update(overrides)
    return {"series_id": series_id, "candle": c}


# --- the write body ----------------------------------------------------------------------


def bad(t: object = T0, series_id: object = BTC, **candle_fields: object) -> bytes:
    return orjson.dumps(body_for(t, series_id, **candle_fields))


NO_VOLUME = {
    "series_id": BTC,
    "candle": {k: v for k, v in body_for()["candle"].items() if k != "volume"},
}

BAD_BODIES: list[tuple[str, bytes, str, str]] = [
    ("not json", b"{not json", "body", "not valid JSON"),
    ("not an object", b"[1, 2]", "body", "expected a JSON object"),
    ("empty", b"", "body", "not valid JSON"),
    ("unknown top field", orjson.dumps({**body_for(), "x": 1}), "body", "unknown field(s) x"),
    ("no series_id", orjson.dumps({"candle": body_for()["candle"]}), "series_id", "required"),
    ("series_id not str", bad(series_id=7), "series_id", "non-empty string"),
    ("bad symbol", bad(series_id="binance:futures:BTC-USDT:1m"), "series_id", "bad symbol"),
    ("bad market", bad(series_id="binance:options:BTC/USDT:1m"), "series_id", "unknown market"),
    ("derived series", bad(series_id=BTC5), "series_id", "only base 1m series accept writes"),
    ("unserved 1h", bad(series_id="binance:futures:BTC/USDT:1h"), "series_id", "only base 1m"),
    ("no candle", orjson.dumps({"series_id": BTC}), "candle", "candle: required"),
    (
        "candle list",
        orjson.dumps({"series_id": BTC, "candle": [1]}),
        "candle",
        "expected an object",
    ),
    ("unknown candle field", bad(close_time=1), "candle", "unknown field(s) close_time"),
    ("no volume", orjson.dumps(NO_VOLUME), "candle.volume", "required"),
    ("misaligned time", bad(T0 + 61), "candle.candle_time", "not aligned to 1m"),
    ("float time", bad(float(T0)), "candle.candle_time", "expected an integer"),
    ("string time", bad(str(T0)), "candle.candle_time", "expected an integer"),
    ("negative time", bad(-60), "candle.candle_time", "negative"),
    ("milliseconds", bad(T0 * 1000), "candle.candle_time", "milliseconds"),
    ("high below low", bad(high="9", low="10", open="9", close="9"), "candle.high", "below low"),
    ("open above high", bad(open="102"), "candle.open", "outside"),
    ("negative volume", bad(volume="-1"), "candle.volume", "volume must not be negative"),
    ("text price", bad(open="abc"), "candle.open", "not a decimal number"),
    ("bool price", bad(open=True), "candle.open", "expected a number"),
    ("null price", bad(close=None), "candle.close", "expected a number"),
    ("NaN string", bad(low="NaN"), "candle.low", "not a decimal number"),
    ("huge exponent", bad(high="1e400"), "candle.high", "out of range"),
    ("underscore digits", bad(volume="1_000"), "candle.volume", "not a decimal"),
]


@pytest.mark.parametrize(
    ("raw", "field", "fragment"),
    [pytest.param(raw, field, fragment, id=name) for name, raw, field, fragment in BAD_BODIES],
)
def test_bad_bodies_are_422_naming_the_field(raw: bytes, field: str, fragment: str) -> None:
    with pytest.raises(RequestRefused) as info:
        parse_ingest_body(raw, WRITABLE, now=NOW)
    refusal = info.value
    assert (refusal.status, refusal.code) == (422, "bad_request")
    doc = refusal.to_wire()
    assert any(e["field"] == field and fragment in e["message"] for e in doc["errors"]), doc
    assert fragment in doc["message"]


def test_every_bad_candle_field_is_reported_at_once() -> None:
    with pytest.raises(RequestRefused) as info:
        parse_ingest_body(orjson.dumps(body_for(1.5, open="x", volume=None)), WRITABLE, now=NOW)
    assert [p.field for p in info.value.problems] == [
        "candle.candle_time",
        "candle.open",
        "candle.volume",
    ]


def test_every_problem_of_the_values_is_reported_at_once() -> None:
    """The rules between values (high and low, the range, signs) and a misaligned time,
    each under its field, however many there are."""
    cases = [
        (body_for(high="1", low="2", open="1", close="1", volume="-1"), ["high", "volume"]),
        (body_for(T0 + 61, volume="-1"), ["candle_time", "volume"]),
        (body_for(T0 + 61, open="NaN"), ["open", "candle_time"]),
        (body_for(open="102", close="0.5", volume="-2"), ["open", "close", "volume"]),
    ]
    for body, fields in cases:
        with pytest.raises(RequestRefused) as info:
            parse_ingest_body(orjson.dumps(body), WRITABLE, now=NOW)
        assert [p.field for p in info.value.problems] == [f"candle.{f}" for f in fields]


def test_an_unserved_base_series_is_422_unknown_series() -> None:
    with pytest.raises(RequestRefused) as info:
        parse_ingest_body(
            orjson.dumps(body_for(series_id="binance:futures:SOL/USDT:1m")), WRITABLE, now=NOW
        )
    assert (info.value.status, info.value.code) == (422, "unknown_series")


def test_a_good_body_keeps_values_exactly() -> None:
    raw = orjson.dumps(body_for(open=0.1, high="65000.10", low=0.007, close=1e-2, volume=3))
    series, candle = parse_ingest_body(raw, WRITABLE, now=NOW)
    assert series == SeriesId.parse(BTC)
    assert candle == Candle(
        T0, Decimal("0.1"), Decimal("65000.10"), Decimal("0.007"), Decimal("0.01"), Decimal(3)
    )
    assert str(candle.high) == "65000.10"  # decimal strings exactly as sent


def test_decimals_and_candle_times() -> None:
    assert str(parse_decimal("x", 0.1)) == "0.1"  # the float's repr, not its binary value
    assert parse_decimal("x", "-0") == 0 and str(parse_decimal("x", "1e-30")) == "1E-30"
    for bad in ("1e31", "inf", True, None, [1]):
        with pytest.raises(ValueError, match="x: "):
            parse_decimal("x", bad)
    assert parse_candle_time(T0) == T0
    for bad_time in (-1, T0 * 1000, 1.0, "1"):
        with pytest.raises(ValueError, match=r"candle\.candle_time"):
            parse_candle_time(bad_time)


# --- the candle query ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "fields"),
    [
        ({}, ["series_id"]),
        ({"series_id": ""}, ["series_id"]),
        ({"series_id": "BTCUSDT"}, ["series_id"]),
        ({"series_id": "binance:futures:BTC/USDT:7x"}, ["series_id"]),
        ({"series_id": BTC, "since": "1.5"}, ["since"]),
        ({"series_id": BTC, "since": "abc"}, ["since"]),
        ({"series_id": BTC, "since": "99999999999999999999999"}, ["since"]),
        ({"series_id": BTC, "limit": "0"}, ["limit"]),
        ({"series_id": BTC, "limit": str(MAX_LIMIT + 1)}, ["limit"]),
        ({"series_id": BTC, "limit": "ten"}, ["limit"]),
        ({"series_id": "nope", "since": "x", "limit": "-1"}, ["series_id", "since", "limit"]),
        ({"series_id": BTC, "before": "-60"}, ["before"]),
        ({"series_id": BTC, "before": "1751760000000", "since": "1.5"}, ["since", "before"]),
        ([("series_id", BTC), ("before", "1"), ("before", "2")], ["before"]),
        ([("series_id", BTC), ("series_id", ETH)], ["series_id"]),
        # an inverted window (an empty one, since=t&before=t+1, is a paging loop's last step)
        ({"series_id": BTC, "since": "100", "before": "100"}, ["before"]),
        ({"series_id": BTC, "since": "100", "before": "40"}, ["before"]),
        # near misses and Binance's own parameters would answer another window silently
        ({"series_id": BTC, "befor": "1751760000"}, ["befor"]),
        ({"series_id": BTC, "Since": "1751760000", "lmit": "5"}, ["Since", "lmit"]),
        ({"series_id": BTC, "startTime": "1751760000000"}, ["startTime"]),
    ],
)
def test_bad_candle_queries_are_422_naming_each_parameter(params: Any, fields: list[str]) -> None:
    with pytest.raises(RequestRefused) as info:
        parse_candles_query(QueryParams(params), SERVED)
    assert (info.value.status, info.value.code) == (422, "bad_request")
    assert [p.field for p in info.value.problems] == fields
    for field in fields:
        assert f"{field}:" in info.value.message


def test_candle_queries() -> None:
    btc = SeriesId.parse(BTC)
    assert parse_candles_query(QueryParams({"series_id": BTC}), SERVED) == CandlesQuery(
        btc, None, DEFAULT_LIMIT
    )
    query = QueryParams({"series_id": BTC, "since": "0", "limit": str(MAX_LIMIT)})
    assert parse_candles_query(query, SERVED) == CandlesQuery(btc, 0, MAX_LIMIT)
    query = QueryParams({"series_id": BTC, "before": str(T0), "since": ""})
    assert parse_candles_query(query, SERVED) == CandlesQuery(btc, None, DEFAULT_LIMIT, T0)
    query = QueryParams({"series_id": BTC, "since": "100", "before": "101"})
    assert parse_candles_query(query, SERVED) == CandlesQuery(btc, 100, DEFAULT_LIMIT, 101)
    # another unknown parameter (a cache buster) is ignored
    query = QueryParams({"series_id": BTC, "_": "1751760000123", "since": "0", "before": "2"})
    assert parse_candles_query(query, SERVED) == CandlesQuery(btc, 0, DEFAULT_LIMIT, 2)
    for sid, hint in (
        ("binance:futures:SOL/USDT:1m", "/api/market/series"),
        ("binance:futures:BTC/USDT:15m", "binance:futures:BTC/USDT is served in 1m, 5m"),
    ):
        with pytest.raises(RequestRefused) as info:
            parse_candles_query(QueryParams({"series_id": sid}), SERVED)
        assert (info.value.status, info.value.code) == (404, "unknown_series")
        assert hint in info.value.message


@pytest.mark.parametrize(
    ("since", "message"),
    [
        ("-1", "since: must not be negative, got -1"),
        ("1751760000000", "1751760000000 is too large: candle_time is in seconds, not milli"),
    ],
)
def test_a_since_negative_or_in_milliseconds_is_refused_as_on_the_socket(
    since: str, message: str
) -> None:
    """Milliseconds (Binance's unit) read an empty history, a negative cursor the whole of
    it, without a word; /ws/market refuses both."""
    with pytest.raises(RequestRefused) as info:
        parse_candles_query(QueryParams({"series_id": BTC, "since": since}), SERVED)
    assert (info.value.status, info.value.code) == (422, "bad_request")
    assert message in info.value.message


# --- the bearer token --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("authorization", "error_hint"),
    [
        (None, None),
        ("", None),
        ("Bearer", "invalid_token"),
        ("Bearer wrong-token-0123456789abcdef", "invalid_token"),
        (f"Bearer {TOKEN}x", "invalid_token"),
        (f"Bearer {TOKEN[:-1]}", "invalid_token"),
        (f"Basic {TOKEN}", "invalid_token"),
        (TOKEN, "invalid_token"),
        ("Bearer tökén", "invalid_token"),
        ("Bearer t\udcf6k", "invalid_token"),  # undecodable bytes, as surrogates
    ],
)
def test_a_missing_or_bad_token_is_401_with_a_bearer_challenge(
    authorization: str | None, error_hint: str | None
) -> None:
    with pytest.raises(RequestRefused) as info:
        check_bearer(authorization, TOKEN)
    refusal = info.value
    assert (refusal.status, refusal.code) == (401, "unauthorized")
    challenge = refusal.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert (error_hint or "") in challenge
    assert TOKEN not in refusal.message


def test_the_token_is_accepted_with_any_case_of_scheme_and_refused_when_unset() -> None:
    check_bearer(f"Bearer {TOKEN}", TOKEN)
    check_bearer(f"bearer  {TOKEN} ", TOKEN)
    with pytest.raises(RequestRefused) as info:
        check_bearer(f"Bearer {TOKEN}", None)
    assert (info.value.status, info.value.code) == (403, "ingest_disabled")
    assert "TRADE_CANVAS_INGEST_TOKEN" in info.value.message


def test_a_candle_that_has_not_closed_yet_is_refused() -> None:
    # closes at most CLOCK_SKEW_S after now: taken (clocks differ); a second later: refused
    last = int(NOW + CLOCK_SKEW_S - 60) // 60 * 60
    _, candle = parse_ingest_body(orjson.dumps(body_for(last)), WRITABLE, now=NOW)
    assert candle.candle_time == last
    for future in (last + 60, 32_503_680_000):  # the next minute; the year 3000
        with pytest.raises(RequestRefused) as info:
            parse_ingest_body(orjson.dumps(body_for(future)), WRITABLE, now=NOW)
        assert (info.value.status, info.value.code) == (422, "bad_request")
        [problem] = info.value.problems
        assert problem.field == "candle.candle_time"
        assert "only closed candles are written" in problem.message
    message = info.value.to_wire()["message"]
    assert "3000-01-01 00:00:00 UTC" in message and "2025-07-07 00:00:00 UTC" in message


def test_after_takes_every_event_id_events_after_takes() -> None:
    served = frozenset(WRITABLE)
    assert parse_events_query(QueryParams(f"after={MAX_EVENT_ID}"), served)[0] == MAX_EVENT_ID
    subscribe = {"type": "subscribe", "series_id": BTC, "events_after": MAX_EVENT_ID}
    assert parse_client_message(orjson.dumps(subscribe).decode()) is not None
    for bad in (MAX_EVENT_ID + 1, -1):
        with pytest.raises(RequestRefused) as info:
            parse_events_query(QueryParams(f"after={bad}"), served)
        [problem] = info.value.problems
        assert f"an integer from 0 to {MAX_EVENT_ID}" in problem.message


def test_a_huge_bad_series_id_is_not_echoed_whole() -> None:
    huge = "x" * 60_000
    with pytest.raises(ClientMessageError) as info:
        parse_client_message(orjson.dumps({"type": "subscribe", "series_id": huge}).decode())
    wire = orjson.dumps(info.value.to_wire())
    assert len(wire) < 1_000, len(wire)
    assert "(60000 characters)" in info.value.message
    with pytest.raises(RequestRefused) as refused:
        parse_ingest_body(orjson.dumps(body_for(series_id=huge)), WRITABLE, now=NOW)
    assert len(orjson.dumps(refused.value.to_wire())) < 1_000


def test_the_documented_error_example_is_what_the_api_answers() -> None:
    """docs/api.md's example of a 422 listing two bad parameters, word for word."""
    api = (Path(__file__).parents[2] / "docs" / "api.md").read_text()
    errors = api[api.index('An error is `{"error": <code>') :]
    start = errors.index("```json") + len("```json")
    block = errors[start : errors.index("\n```", start)]
    with pytest.raises(RequestRefused) as info:
        parse_candles_query(QueryParams(f"series_id={BTC}&since=abc&limit=0"), WRITABLE)
    assert info.value.to_wire() == orjson.loads(block)
