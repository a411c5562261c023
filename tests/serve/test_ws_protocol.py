"""The /ws/market protocol without sockets: client message parsing, the token bucket and the
abuse rule, the Origin allow-list, header lookup."""

from __future__ import annotations

import itertools
from typing import Final

import pytest

from tradecanvas.errors import ClientMessageError
from tradecanvas.model import SeriesId, Timeframe
from tradecanvas.ops import metrics
from tradecanvas.runtime_flags import DEFAULT_ALLOWED_ORIGINS
from tradecanvas.serve.subscriber_queue import SLOW_CONSUMER_CAUSES
from tradecanvas.serve.ws_protocol import (
    REFUSAL_REASONS,
    InboundLimits,
    PingRequest,
    RateLimiter,
    SubscribeRequest,
    TokenBucket,
    UnsubscribeRequest,
    header,
    origin_allowed,
    parse_client_message,
    refuse_handshake,
    request_path,
)
from tradecanvas.wire.json import dumps

SERIES_1M: Final = SeriesId.parse("binance:futures:BTC/USDT:1m")
SERIES_5M: Final = SERIES_1M.with_timeframe(Timeframe.parse("5m"))
SID_1M: Final = str(SERIES_1M)
SID_5M: Final = str(SERIES_5M)


def subscribe_msg(series_id: str, since: int | None, batch: bool) -> dict[str, object]:
    return {"type": "subscribe", "series_id": series_id, "since": since, "supports_batch": batch}


def test_parse_valid_messages() -> None:
    assert parse_client_message('{"type":"ping"}') == PingRequest()
    assert parse_client_message(b'{"type":"ping","id":7}') == PingRequest()
    assert parse_client_message(
        dumps({"type": "subscribe", "series_id": SID_1M, "since": 1751760000})
    ) == SubscribeRequest(SERIES_1M, 1751760000, False)
    assert parse_client_message(dumps(subscribe_msg(SID_5M, None, True))) == SubscribeRequest(
        SERIES_5M, None, True
    )
    assert parse_client_message(
        dumps({"type": "subscribe", "series_id": SID_1M, "supports_batch": None})
    ) == SubscribeRequest(SERIES_1M, None, False)
    assert parse_client_message(
        dumps({"type": "unsubscribe", "series_id": SID_5M})
    ) == UnsubscribeRequest(SERIES_5M)


BAD_MESSAGES: Final = [
    ("not json at all", "not valid JSON"),
    ("", "not valid JSON"),
    (b"\xff\xfe", "not valid JSON"),
    ("[1, 2]", "got a JSON array"),
    ('"subscribe"', "got a JSON string"),
    ("42", "got a JSON number"),
    ("null", "got a JSON null"),
    ("{}", 'has no "type"'),
    ('{"series_id":"binance:futures:BTC/USDT:1m"}', 'has no "type"'),
    ('{"type":null}', "unknown type null"),
    ('{"type":7}', "unknown type number 7"),
    ('{"type":"subscribe_all"}', "unknown type string 'subscribe_all'"),
    ('{"type":"subscribe"}', "subscribe needs a series_id"),
    ('{"type":"unsubscribe"}', "unsubscribe needs a series_id"),
    ('{"type":"subscribe","series_id":5}', "series_id must be a non-empty string"),
    ('{"type":"subscribe","series_id":""}', "series_id must be a non-empty string"),
    ('{"type":"subscribe","series_id":"BTCUSDT"}', "expected exchange:market:symbol:timeframe"),
    ('{"type":"subscribe","series_id":"okx:futures:BTC/USDT:1m"}', "unknown exchange 'okx'"),
    ('{"type":"subscribe","series_id":"binance:margin:BTC/USDT:1m"}', "unknown market 'margin'"),
    ('{"type":"subscribe","series_id":"binance:futures:btcusdt:1m"}', "bad symbol 'btcusdt'"),
    ('{"type":"subscribe","series_id":"binance:futures:BTC/USDT:7x"}', "bad timeframe '7x'"),
    ('{"type":"subscribe","series_id":"binance:futures:BTC/USDT:0m"}', "bad timeframe '0m'"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","since":true}}', "got a boolean true"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","since":false}}', "got a boolean false"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","since":1.5}}', "got a number 1.5"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","since":1751760000.0}}', "got a number"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","since":"1751760000"}}', "got a string"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","since":[1]}}', "got a array"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","since":-60}}', "must not be negative"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","since":1751760000000}}', "not milliseconds"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","supports_batch":1}}', "supports_batch"),
    (f'{{"type":"subscribe","series_id":"{SID_1M}","supports_batch":"yes"}}', "true or false"),
]


@pytest.mark.parametrize(("raw", "says"), BAD_MESSAGES)
def test_parse_rejects_bad_messages_saying_what_is_wrong(raw: str | bytes, says: str) -> None:
    with pytest.raises(ClientMessageError) as info:
        parse_client_message(raw)
    assert info.value.code == "bad_request"
    assert says in info.value.message


def test_token_bucket_and_abuse_rule() -> None:
    bucket = TokenBucket(rate=20, burst=40, now=0.0)
    assert all(bucket.take(0.0) for _ in range(40))
    assert not bucket.take(0.0)
    assert bucket.take(0.05)  # one token per 1/20 s
    assert not bucket.take(0.05)
    assert sum(bucket.take(100.0) for _ in range(100)) == 40  # never more than the burst
    limits = InboundLimits(messages_per_s=20, burst=40, abuse_after_s=5, quiet_s=1)
    # a chart subscribing to a dozen series, twice a second, never meets the limit
    calm = RateLimiter(limits, now=0.0)
    assert all(calm.check(i * 0.5) == "ok" for i in range(12 * 20))
    # one burst too many: refused, then forgiven after a quiet second
    burst = RateLimiter(limits, now=0.0)
    assert [burst.check(0.0) for _ in range(42)][-3:] == ["ok", "limited", "ignored"]
    assert burst.check(2.0) == "ok" and burst.limited_since is None
    # a flood of 100 messages/s: 20/s still pass, the rest are refused; closed after 5 s
    flood = RateLimiter(limits, now=0.0)
    verdicts = [(i / 100, flood.check(i / 100)) for i in range(700)]
    first_refusal = next(t for t, v in verdicts if v == "limited")
    abuse = [t for t, v in verdicts if v == "abuse"]
    assert abuse and abuse[0] == pytest.approx(first_refusal + 5, abs=0.011)
    assert {v for t, v in verdicts if t < first_refusal + 5} == {"ok", "limited", "ignored"}
    # answered at most once a second (the client that floods need not read them all)
    answered = [t for t, v in verdicts if v == "limited"]
    assert len(answered) == 5
    assert all(b - a >= 1.0 for a, b in itertools.pairwise(answered))


@pytest.mark.parametrize(
    ("origin", "allowed"),
    [
        (None, True),
        ("http://localhost", True),
        ("http://localhost:3000", True),
        ("https://127.0.0.1:8443", True),
        ("HTTP://LOCALHOST:5173", True),
        ("http://evil.example", False),
        ("http://localhost.evil.example", False),
        ("null", False),
        ("ftp://localhost", False),
        ("http://localhost:notaport", False),
    ],
)
def test_origin_allow_list(origin: str | None, allowed: bool) -> None:
    assert origin_allowed(origin, DEFAULT_ALLOWED_ORIGINS) is allowed


def test_origin_allow_list_with_port_and_star() -> None:
    exact = ["https://charts.example:8443"]
    assert origin_allowed("https://charts.example:8443", exact)
    assert not origin_allowed("https://charts.example:9000", exact)
    assert not origin_allowed("http://charts.example:8443", exact)
    assert origin_allowed("http://anything.example", ["*"])


def test_header_lookup_and_request_path() -> None:
    headers = [(b"host", b"127.0.0.1"), (b"Origin", b"http://localhost:5173")]
    assert header(headers, b"origin") == "http://localhost:5173"
    assert header(headers, b"authorization") is None
    assert request_path("/ws/market?client=chart") == "/ws/market"
    assert request_path("/ws/market") == "/ws/market"


def test_rate_limited_answer_names_the_limits() -> None:
    error = InboundLimits(messages_per_s=5, burst=10).rate_limited_error()
    assert error.to_wire() == {
        "type": "error",
        "code": "rate_limited",
        "message": "too many messages: at most 5/s (bursts of 10); this one was ignored",
    }


def test_the_handshake_answer_path_then_origin_then_shutdown() -> None:
    allowed = DEFAULT_ALLOWED_ORIGINS
    chart = "http://localhost:5173"
    assert refuse_handshake("/ws/market?client=chart", chart, allowed, closing=False) is None
    assert refuse_handshake("/ws/market", None, allowed, closing=False) is None
    not_found = refuse_handshake("/ws/market/", "http://evil.example", allowed, closing=True)
    assert not_found is not None and not_found.status == 404
    assert b"/ws/market" in not_found.body and "'/ws/market/'" in not_found.why
    forbidden = refuse_handshake("/ws/market", "http://evil.example", allowed, closing=True)
    assert forbidden is not None and (forbidden.status, forbidden.body) == (
        403,
        b"origin not allowed\n",
    )
    closing = refuse_handshake("/ws/market", None, allowed, closing=True)
    assert closing is not None and closing.status == 503


def test_the_connection_limit_is_answered_503_after_the_other_rules() -> None:
    allowed = DEFAULT_ALLOWED_ORIGINS
    assert refuse_handshake("/ws/market", None, allowed, closing=False, connections=2) is None
    below = refuse_handshake(
        "/ws/market", None, allowed, closing=False, connections=2, max_connections=3
    )
    assert below is None
    full = refuse_handshake(
        "/ws/market", None, allowed, closing=False, connections=3, max_connections=3
    )
    assert full is not None and (full.status, full.reason) == (503, "max_connections")
    assert b"at most 3" in full.body
    origin_first = refuse_handshake(
        "/ws/market", "http://evil.example", allowed, closing=False, connections=9,
        max_connections=3,
    )  # fmt: skip
    assert origin_first is not None and origin_first.reason == "origin"


def test_the_metrics_know_every_refusal_reason_and_slow_consumer_cause() -> None:
    assert metrics.WS_REFUSAL_REASONS == REFUSAL_REASONS
    assert metrics.SLOW_CONSUMER_CAUSES == SLOW_CONSUMER_CAUSES
