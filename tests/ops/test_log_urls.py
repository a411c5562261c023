"""The passwords of URLs in log lines (review rev36): taken out also when they hold ``/``,
``?`` or ``#`` unencoded (a URL's user information that cannot be told apart is hidden up to
its last ``@``), while an ordinary URL with a port and an ``@`` in its path — a Binance
stream — is left as it is (it became ``wss://stream.binance.com:<redacted>@kline_1m``)."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.ops.logs import Redactor
from tradecanvas.service_urls import url_secrets, url_without_password

REDACT = Redactor()


@pytest.mark.parametrize(
    "url",
    [
        "wss://stream.binance.com:9443/ws/btcusdt@kline_1m",
        "wss://fstream.binance.com:443/stream?streams=btcusdt@kline_1m/ethusdt@kline_1h",
        "http://[::1]:8766/x@y",
        "http://127.0.0.1:8766/x@kline_5m?a=b@c_d#e@f_g",
        "https://h/a:b@c",  # no port: the ":" is the path's
    ],
)
def test_an_ordinary_url_with_an_at_in_its_path_is_left_alone(url: str) -> None:
    assert REDACT(f"connecting to {url} (attempt 2)") == f"connecting to {url} (attempt 2)"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:Pa5s/w?rd@h/db", "postgresql://u:<redacted>@h/db"),
        ("postgresql://u:1234/x@db.internal:5432/tc", "postgresql://u:<redacted>@db.internal:5432/tc"),
        ("redis://:a#b/c@[::1]:6379/0", "redis://:<redacted>@[::1]:6379/0"),
        ("postgresql://u:p/w@h1:5432,h2/db", "postgresql://u:<redacted>@h1:5432,h2/db"),
        ("postgresql://u:p@s/s?w@h/db", "postgresql://u:<redacted>@h/db"),
        ("postgresql://u:s@cret@my_db/x@kline_1m", "postgresql://u:<redacted>@my_db/x@kline_1m"),
    ],
)  # fmt: skip
def test_a_password_holding_slash_question_or_hash_is_taken_out(url: str, shown: str) -> None:
    assert REDACT(f"store at {url} away") == f"store at {shown} away"


_USER = st.text(string.ascii_letters + string.digits + "._~-!$&()*+,;", max_size=8)
# what a password may hold in a log line's URL (a space or quote ends the URL there; "="
# could make part of it a query parameter, which is hidden as well, but further)
_PASSWORD = st.text(
    "".join(c for c in string.printable if c not in string.whitespace + "\"'\\="),
    min_size=1,
    max_size=16,
)
_LABEL = st.from_regex(r"[a-z0-9][a-z0-9-]{0,6}", fullmatch=True)
_HOST = st.one_of(
    st.lists(_LABEL, min_size=1, max_size=3).map(".".join),
    st.tuples(*[st.integers(0, 255)] * 4).map(lambda q: ".".join(map(str, q))),
    st.sampled_from(["[::1]", "[2001:db8::7]", "localhost"]),
)
_PORT = st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}"))
# a path and a query with no "@" (and no parameter a secret is named after)
_REST = st.one_of(st.just(""), st.from_regex(r"[/?#][abcxyz0-9/?#&=.:_-]{0,20}", fullmatch=True))
_SCHEME = st.sampled_from(["postgresql", "redis", "rediss", "https", "wss", "amqp"])
# what may stand around a URL in a line: brackets, and a sentence's punctuation after it
# ("connect failed (redis://u:pa/ss@redis:6379)." showed the password)
_AROUND = st.tuples(
    st.sampled_from(["", "(", "[", "<", "{", "`"]),
    st.text(")]}>.,;:!`", max_size=3),
)


@given(_SCHEME, _USER, _PASSWORD, _HOST, _PORT, _REST, _AROUND)
def test_no_password_survives_and_nothing_else_is_taken(
    scheme: str, user: str, password: str, host: str, port: str, rest: str,
    around: tuple[str, str],
) -> None:  # fmt: skip
    url = f"{scheme}://{user}:{password}@{host}{port}{rest}"
    shown = f"{scheme}://{user}:<redacted>@{host}{port}{rest}"
    before, after = around
    assert REDACT(f"x {before}{url}{after} y") == f"x {before}{shown}{after} y"
    assert url_without_password(url) == shown
    assert password in url_secrets(url)


@pytest.mark.parametrize(
    "line",
    [
        "connect failed (redis://user:pa/ss@redis:6379).",
        "connect failed [postgresql://u:1234/x@db.internal:5432], retrying",
        "store <redis://:a#b/c@[::1]:6379>: refused",
        "failed: redis://user:pa/ss@h1:5432,h2!",
    ],
)
def test_a_password_before_a_closing_bracket_or_a_full_stop_is_taken_out(line: str) -> None:
    assert REDACT(line).count("<redacted>") == 1
    assert "pa/ss" not in REDACT(line) and "1234/x" not in REDACT(line)
    assert "a#b/c" not in REDACT(line)


# a path holding "@" and ":" anywhere after a host without a port, or Binance's streams
# after one with a port
_ANY_REST = st.from_regex(r"[/?#][abcxyz0-9/?#&=.:@_-]{0,24}", fullmatch=True)
_STREAMS = st.lists(
    st.from_regex(r"[a-z0-9]{1,8}@kline_[0-9]{1,2}[mhdwM]", fullmatch=True),
    min_size=1,
    max_size=3,
)


@given(
    _SCHEME,
    st.one_of(
        st.tuples(_HOST, st.just(""), _ANY_REST),
        st.tuples(_HOST, _PORT, _STREAMS.map(lambda s: "/stream?streams=" + "/".join(s))),
        st.tuples(_HOST, _PORT, _STREAMS.map(lambda s: f"/ws/{s[0]}")),
        st.tuples(st.just("[::1]"), _PORT, _ANY_REST),
    ),
    _AROUND,
)
def test_a_url_without_user_information_is_left_as_it_is(
    scheme: str, parts: tuple[str, str, str], around: tuple[str, str]
) -> None:
    url = f"{scheme}://{''.join(parts)}"
    before, after = around
    assert REDACT(f"x {before}{url}{after} y") == f"x {before}{url}{after} y"
