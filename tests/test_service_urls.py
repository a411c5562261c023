"""The service URLs shown without their secrets: ``url_without_password`` (user information and
query parameters), the flags' errors and ``tradecanvas flags``, which quoted them whole."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tradecanvas.errors import FlagError
from tradecanvas.runtime_flags import build_runtime_flags, describe_flags
from tradecanvas.service_urls import (
    parse_database_url,
    parse_redis_url,
    url_secrets,
    url_without_password,
)

SHOWN_CASES = [
    ("postgresql://user:secret@127.0.0.1:5432/db", "postgresql://user:<redacted>@127.0.0.1:5432/db"),
    ("redis://:rsecret@127.0.0.1:6379/0", "redis://:<redacted>@127.0.0.1:6379/0"),
    ("redis://default:rsecret@127.0.0.1:6312/0", "redis://default:<redacted>@127.0.0.1:6312/0"),
    # a password holding "@" (split at the LAST one), "/", "?" or "#", unencoded
    ("postgresql://user:s@cr@et@127.0.0.1/db", "postgresql://user:<redacted>@127.0.0.1/db"),
    ("postgresql://user:se/cret@h/db?sslmode=off", "postgresql://user:<redacted>@h/db?sslmode=off"),
    ("postgresql://user:se?cret@h/db", "postgresql://user:<redacted>@h/db"),
    ("redis://:se#cret@h", "redis://:<redacted>@h"),
    # query parameters: any name holding password, secret or token (any case, encoded);
    # passfile names a file
    ("postgresql://h/db?password=qsecret", "postgresql://h/db?password=<redacted>"),
    (
        "postgresql://u:pw0rd@h/db?sslpassword=ssl1&passfile=/etc/pgpass&application_name=ab",
        "postgresql://u:<redacted>@h/db?sslpassword=<redacted>&passfile=/etc/pgpass"
        "&application_name=ab",
    ),
    # an "@" past "/", "?" or "#": a password's or the query's cannot be told apart, so up
    # to the last one (review rev36: a password holding "/" then "?" was shown whole)
    ("postgresql://u:Pa5s/w?rd@h/db", "postgresql://u:<redacted>@h/db"),
    ("postgresql://u:p@s/s?w@h/db", "postgresql://u:<redacted>@h/db"),
    ("redis://:a/b#c@my_redis:6379/0", "redis://:<redacted>@my_redis:6379/0"),
    ("postgresql://u:pw0rd@h/db?application_name=a@b", "postgresql://u:<redacted>@b"),
    (
        "redis://:rs@127.0.0.1:6379/0?password=qrsecret",
        "redis://:<redacted>@127.0.0.1:6379/0?password=<redacted>",
    ),
    ("redis://h/0?Client_Secret=x&api-TOKEN=y", "redis://h/0?Client_Secret=<redacted>&api-TOKEN=<redacted>"),
    ("redis://h?PASS%57ORD=a@b", "redis://h?PASS%57ORD=<redacted>"),
    ("postgresql:///db?host=/run/pg&password=pw0rd", "postgresql:///db?host=/run/pg&password=<redacted>"),
    # nothing to hide
    ("postgresql://user@127.0.0.1/db", "postgresql://user@127.0.0.1/db"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("wss://fstream.binance.com/market", "wss://fstream.binance.com/market"),
    (None, "<unset>"),
]  # fmt: skip


@pytest.mark.parametrize(("url", "shown"), SHOWN_CASES)
def test_a_url_is_shown_without_its_secrets(url: str | None, shown: str) -> None:
    assert url_without_password(url) == shown
    assert url_without_password(shown) == shown  # shown twice: the same
    for secret in url_secrets(url):
        assert secret not in shown.replace("<redacted>", "")


def test_the_secrets_are_listed_as_written_and_decoded() -> None:
    url = "postgresql://u:p%40ss@h/db?sslpassword=a+b&password=qsecret&passfile=/x"
    assert set(url_secrets(url)) == {"p%40ss", "p@ss", "a+b", "a b", "qsecret"}
    assert url_secrets("redis://h/0") == url_secrets(None) == ()
    # for the log's redactor: it missed a password holding "/" then "?" or "#"
    assert url_secrets("postgresql://u:Pa5s/w?rd@h/db") == ("Pa5s/w?rd",)
    assert url_secrets("redis://:a/b#c@h/0") == ("a/b#c",)


SECRET = "hunter2-secret"
BAD_URLS = [
    ("postgresql://user:{s}@127.0.0.1:99999/db", "a bad port"),
    ("postgresql://user:{s}@127.0.0.1:0/db", "port 0"),
    ("postgresql://user:{s}@127.0.0.1:5432/?password={s}", "no database name"),
    ("postgresql://user:{s}@[::1/db", "a bad host"),
    ("postgresql://user:x\uff03{s}@127.0.0.1/db", "a bad host"),  # NFKC makes it a "#"
    ("redis://:{s}@127.0.0.1:99999/0", "a bad port"),
    ("redis://default:{s}@127.0.0.1:0/0", "port 0"),
    ("redis://:12/{s}@127.0.0.1:6379/0", "is not a number"),
    ("postgresql://user:{s}/w?x@127.0.0.1/db", "a bad port"),
    ("redis://:{s}/w#x@127.0.0.1/0", "a bad port"),
    ("redis://127.0.0.1:6379/abc?password={s}", "is not a number"),
]


@pytest.mark.parametrize(("template", "fragment"), BAD_URLS)
def test_a_bad_url_is_refused_without_quoting_its_password(template: str, fragment: str) -> None:
    url = template.format(s=SECRET)
    parse = parse_redis_url if url.startswith("redis") else parse_database_url
    with pytest.raises(ValueError, match=fragment) as info:
        parse(url)
    assert SECRET not in str(info.value)
    variable = "TRADE_CANVAS_REDIS_URL" if url.startswith("redis") else "TRADE_CANVAS_DATABASE_URL"
    with pytest.raises(FlagError) as flag_info:
        build_runtime_flags({variable: url})
    assert SECRET not in str(flag_info.value)


@pytest.mark.parametrize(
    "variable", ["TRADE_CANVAS_BINANCE_SPOT_WS_URL", "TRADE_CANVAS_BINANCE_SPOT_REST_URL"]
)
def test_a_bad_binance_url_is_refused_without_quoting_its_password(variable: str) -> None:
    with pytest.raises(FlagError, match="ftp://u:<redacted>@proxy") as info:
        build_runtime_flags({variable: f"ftp://u:{SECRET}@proxy"})
    assert SECRET not in str(info.value)
    https = build_runtime_flags({variable: f"https://u:{SECRET}@proxy"}).flags
    assert (variable, "https://u:<redacted>@proxy") in describe_flags(https)
    assert SECRET not in repr(https)


def _flags_cli(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TRADE_CANVAS_")}
    return subprocess.run(
        [sys.executable, "-m", "tradecanvas", "flags"],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_tradecanvas_flags_never_prints_a_password() -> None:
    """The review's commands: ``flags`` printed ``a bad port in 'user:secret@…'``, the query
    passwords, and the tail of a password holding "@"."""
    for variable, url in [
        ("TRADE_CANVAS_DATABASE_URL", f"postgresql://user:{SECRET}@127.0.0.1:99999/db"),
        ("TRADE_CANVAS_REDIS_URL", f"redis://:{SECRET}@127.0.0.1:0/0"),
        # "/" then "?" in the password: urllib sees the port "hunter2-secret" (rev36)
        ("TRADE_CANVAS_DATABASE_URL", f"postgresql://user:{SECRET}/w?x@127.0.0.1/db"),
    ]:
        refused = _flags_cli({variable: url})
        assert refused.returncode == 2
        assert f"{variable}: " in refused.stderr and "<redacted>@127.0.0.1" in refused.stderr
        assert SECRET not in refused.stdout + refused.stderr
    shown = _flags_cli(
        {
            "TRADE_CANVAS_DATABASE_URL": f"postgresql://user:sec@{SECRET}@127.0.0.1/db"
            f"?password=q{SECRET}&sslpassword=s{SECRET}&passfile=/etc/pgpass",
            "TRADE_CANVAS_REDIS_URL": f"redis://:{SECRET}@127.0.0.1:6379/0?password=q{SECRET}",
        }
    )
    assert shown.returncode == 0, shown.stderr
    assert SECRET not in shown.stdout + shown.stderr
    rows = dict(line.split(None, 1) for line in shown.stdout.splitlines())
    assert rows["TRADE_CANVAS_DATABASE_URL"].strip() == (
        "postgresql://user:<redacted>@127.0.0.1/db"
        "?password=<redacted>&sslpassword=<redacted>&passfile=/etc/pgpass"
    )
    assert rows["TRADE_CANVAS_REDIS_URL"].strip() == (
        "redis://:<redacted>@127.0.0.1:6379/0?password=<redacted>"
    )
