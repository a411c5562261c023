"""Issue 17 item 5, the pure half: hypothesis feeds every decoder of outside input what an
attacker or a broken peer could send. Each either answers or refuses with its documented
error — never another exception:

- Binance frames (``decode_frame``): WireError, and always the reference decoder's answer;
- subscriber messages (``parse_client_message``): ClientMessageError;
- HTTP query strings (``parse_candles_query``, ``parse_events_query``) and write bodies
  (``parse_ingest_body``): RequestRefused with a 4xx status;
- archive CSV rows (``read_kline_csv``): WireError.

Inputs are arbitrary bytes and text, arbitrary JSON, and valid documents with fields replaced
by arbitrary JSON or removed (which reach the deep checks). Seeded (``derandomize``);
200 examples per decoder under ``make test``,
5,000 under ``make soak``. The other half, over real sockets, is
test_fuzz_e2e.py.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.datastructures import QueryParams

from tests.reliability.record import ReliabilityRecord, report, sized
from tradecanvas.errors import ClientMessageError, WireError
from tradecanvas.model import Candle, SeriesId
from tradecanvas.serve.http_validation import (
    RequestRefused,
    parse_candles_query,
    parse_events_query,
    parse_ingest_body,
)
from tradecanvas.serve.ws_protocol import parse_client_message
from tradecanvas.wire.binance import decode_frame, decode_frame_reference, kline_frame
from tradecanvas.wire.kline_csv import read_kline_csv

pytestmark = pytest.mark.slow  # hundreds of examples each: left out of make check

BTC: Final = SeriesId.parse("binance:futures:BTC/USDT:1m")
SERVED: Final = frozenset({BTC, SeriesId.parse("binance:futures:BTC/USDT:5m")})
CANDLE: Final = Candle(
    1_751_760_000, Decimal("100.5"), Decimal("101"), Decimal("99"), Decimal("100"), Decimal("3")
)
EXAMPLES: Final = sized(200, 5000)
SETTINGS: Final = settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)

JSON: Final = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
# strings that pass the first checks: numbers as text, series ids, edge values
TRICKY: Final = st.sampled_from(
    [
        "", "0", "-1", "1e400", "NaN", "Infinity", "-0", "0x10", " 1", "1 ", "1_000",
        "9" * 40, "1." + "0" * 70, "binance:futures:BTC/USDT:1m", "binance:futures:BTC/USDT:7m",
        "binance:spot::1m", "\u0000", "\ud7ff", "1751760000", "1751760000000",
    ]
) | st.integers(min_value=-(2**64), max_value=2**64)  # fmt: skip


def dumps(doc: object) -> bytes:
    """JSON as any peer may write it: integers of any size too (orjson refuses those)."""
    return json.dumps(doc).encode()


def mutated(doc: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """``doc`` (nested dicts) with some values replaced by arbitrary JSON or removed."""

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(json.dumps(doc))
        for _ in range(draw(st.integers(1, 4))):
            node = out
            while True:
                keys = sorted(node)
                if not keys:
                    break
                key = draw(st.sampled_from(keys))
                if isinstance(node[key], dict) and draw(st.booleans()):
                    node = node[key]
                    continue
                if draw(st.integers(0, 4)) == 0:
                    del node[key]
                else:
                    node[key] = draw(JSON | TRICKY)
                break
        return out

    return build()


def report_counts(test: str, counts: Counter[str]) -> None:
    """The record of one fuzzed decoder (``counts``: tried, refused, accepted, crashed); every
    example ran and none crashed it."""
    report(
        ReliabilityRecord(
            test=test,
            seed=0,
            faults=counts["refused"],
            attempted=counts["tried"],
            stored=counts["accepted"],
            delivered=counts["refused"] + counts["accepted"],
            lost=counts["crashed"],
            duplicated=0,
        )
    )
    assert counts["tried"] >= EXAMPLES and counts["crashed"] == 0


def run_checked(name: str, check: Callable[[Counter[str]], None]) -> None:
    counts: Counter[str] = Counter()
    check(counts)
    report_counts(f"fuzz[{name}]", counts)


FRAME: Final = kline_frame(BTC, CANDLE, closed=True, event_time_ms=1_751_760_060_201)


def outcome(decode: Callable[[bytes], object], raw: bytes) -> object:
    try:
        return decode(raw)
    except WireError as exc:
        return ("WireError", exc.reason)


def test_binance_frames() -> None:
    def check(counts: Counter[str]) -> None:
        @SETTINGS
        @given(
            st.binary(max_size=300)
            | JSON.map(dumps)
            | mutated(FRAME).map(dumps)
            | mutated(FRAME["data"]).map(dumps)  # type: ignore[arg-type]
        )
        def one(raw: bytes) -> None:
            counts["tried"] += 1
            fast = outcome(decode_frame, raw)  # anything but WireError fails the test
            assert fast == outcome(decode_frame_reference, raw)
            counts["refused" if isinstance(fast, tuple) else "accepted"] += 1

        one()

    run_checked("binance_frame", check)


SUBSCRIBE: Final = {
    "type": "subscribe",
    "series_id": str(BTC),
    "since": 1_751_760_000,
    "supports_batch": True,
    "events_after": 0,
}


def test_subscriber_messages() -> None:
    def check(counts: Counter[str]) -> None:
        @SETTINGS
        @given(
            st.binary(max_size=200)
            | st.text(max_size=200)
            | JSON.map(dumps)
            | mutated(SUBSCRIBE).map(dumps)
        )
        def one(raw: bytes | str) -> None:
            counts["tried"] += 1
            refused: ClientMessageError | None = None
            try:
                parse_client_message(raw)
            except ClientMessageError as exc:
                refused = exc
            if refused is not None:
                assert refused.code == "bad_request" and refused.message
                assert orjson.dumps(refused.to_wire())  # the reply can be sent
            counts["accepted" if refused is None else "refused"] += 1

        one()

    run_checked("subscriber_message", check)


QUERY_KEYS: Final = st.sampled_from(["series_id", "since", "before", "limit", "after", "x", ""])
QUERY: Final = st.text(max_size=120) | st.lists(
    st.tuples(QUERY_KEYS, st.text(max_size=20) | TRICKY.map(str)), max_size=5
).map(lambda pairs: "&".join(f"{k}={v}" for k, v in pairs))


def test_http_query_strings() -> None:
    def check(counts: Counter[str]) -> None:
        @SETTINGS
        @given(QUERY)
        def one(query: str) -> None:
            params = QueryParams(query)
            for parse in (parse_candles_query, parse_events_query):
                counts["tried"] += 1
                refused: RequestRefused | None = None
                try:
                    parse(params, SERVED)
                except RequestRefused as exc:
                    refused = exc
                if refused is not None:
                    assert 400 <= refused.status < 500 and refused.message
                counts["accepted" if refused is None else "refused"] += 1

        one()

    run_checked("http_query", check)


BODY: Final = {"series_id": str(BTC), "candle": {**CANDLE.to_wire(), "volume": "3"}}
# write bodies: anything, any JSON, the valid body with fields changed, the valid body
BODIES: Final = (
    st.binary(max_size=300) | JSON.map(dumps) | mutated(BODY).map(dumps) | st.just(BODY).map(dumps)
)


def test_http_write_bodies() -> None:
    def check(counts: Counter[str]) -> None:
        @SETTINGS
        @given(BODIES)
        def one(raw: bytes) -> None:
            counts["tried"] += 1
            refused: RequestRefused | None = None
            try:
                series, candle = parse_ingest_body(raw, frozenset({BTC}), now=time.time())
            except RequestRefused as exc:
                refused = exc
            if refused is not None:
                assert refused.status == 422 and refused.problems
            else:
                assert series == BTC and candle.low <= candle.high
            counts["accepted" if refused is None else "refused"] += 1

        one()

    run_checked("http_body", check)


def test_archive_csv_rows(tmp_path: Path) -> None:
    row = "1751760000000,100.5,101,99,100,3,1751760059999,300,7,1.5,150,0"
    cell = st.text(max_size=12) | TRICKY.map(str)

    def check(counts: Counter[str]) -> None:
        @SETTINGS
        @given(
            st.lists(
                st.just(row)
                | st.text(max_size=80)
                | st.lists(cell, min_size=1, max_size=13).map(",".join),
                min_size=1,
                max_size=4,
            )
        )
        def one(rows: list[str]) -> None:
            counts["tried"] += 1
            path = tmp_path / "rows.csv"
            path.write_text("\n".join(rows), encoding="utf-8", errors="surrogatepass")
            reason = ""
            try:
                read_kline_csv(path)
            except WireError as exc:
                reason = exc.reason
            assert reason in ("", "bad_csv_row")
            counts["refused" if reason else "accepted"] += 1

        one()

    run_checked("archive_csv", check)
