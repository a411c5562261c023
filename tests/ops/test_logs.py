"""Logging setup: stderr lines, text or JSON (orjson), and the ingest token never printed."""

from __future__ import annotations

import io
import logging
import re
import subprocess
import sys
from collections.abc import Iterator

import orjson
import pytest

from tradecanvas.ops.logs import REDACTED, ThrottledCount, configure_logging
from tradecanvas.runtime_flags import RuntimeFlags, build_runtime_flags

TOKEN = "log-test-token-0123456789abcdef"


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    """configure_logging replaces the root handlers (pytest's capture among them)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)
    for name, lvl in quiet.items():
        logging.getLogger(name).setLevel(lvl)


def flags(fmt: str = "text", level: str = "INFO", token: str | None = TOKEN) -> RuntimeFlags:
    env = {"TRADE_CANVAS_LOG_FORMAT": fmt, "TRADE_CANVAS_LOG_LEVEL": level}
    if token is not None:
        env["TRADE_CANVAS_INGEST_TOKEN"] = token
    return build_runtime_flags(env).flags


def log_everything_with_the_token(log: logging.Logger) -> None:
    """Every way a token could sneak into a record."""
    log.info("plain message with %s", TOKEN)
    log.warning("header was Authorization: Bearer %s", TOKEN)
    log.info(f"f-string {TOKEN}")  # deliberately pre-formatted
    log.info("in extra", extra={"auth": f"Bearer {TOKEN}", "token_copy": TOKEN})
    try:
        raise RuntimeError(f"failed with token {TOKEN}")
    except RuntimeError:
        log.exception("exception text")
    log.error("args as dict %(t)s", {"t": TOKEN})
    log.info("stack", stack_info=True, extra={"note": [TOKEN]})


def test_json_lines_parse_and_carry_the_fields() -> None:
    out = io.StringIO()
    configure_logging(flags("json"), stream=out)
    log = logging.getLogger("tradecanvas.test")
    log.info("committed %d candles", 3, extra={"series_id": "binance:futures:BTC/USDT:1m"})
    try:
        1 / 0  # noqa: B018
    except ZeroDivisionError:
        log.exception("boom")
    log.debug("hidden at INFO")
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (orjson.loads(line) for line in lines)
    assert first["level"] == "INFO"
    assert first["logger"] == "tradecanvas.test"
    assert first["message"] == "committed 3 candles"
    assert first["series_id"] == "binance:futures:BTC/USDT:1m"
    assert first["ts"].endswith("+00:00")
    assert second["level"] == "ERROR"
    assert "ZeroDivisionError" in second["exc_info"]


def test_text_format_is_one_line_per_record_with_level_and_logger() -> None:
    out = io.StringIO()
    configure_logging(flags("text", "DEBUG"), stream=out)
    logging.getLogger("tradecanvas.x").debug("hello %s", "world")
    assert out.getvalue() == "DEBUG tradecanvas.x: hello world\n"


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_exc_info_without_an_exception_adds_no_line(fmt: str) -> None:
    """coredis logs "Connection closed unexpectedly!" with exc_info=True and no exception:
    logging printed a second line, "NoneType: None"."""
    out = io.StringIO()
    configure_logging(flags(fmt, "INFO"), stream=out)
    logging.getLogger("coredis").info("Connection closed unexpectedly!", exc_info=True)
    assert "NoneType" not in out.getvalue() and len(out.getvalue().splitlines()) == 1


def test_level_filters_and_chatty_libraries_are_quieted() -> None:
    out = io.StringIO()
    configure_logging(flags("text", "WARNING"), stream=out)
    logging.getLogger("tradecanvas").info("not shown")
    logging.getLogger("tradecanvas").warning("shown")
    assert out.getvalue() == "WARNING tradecanvas: shown\n"
    configure_logging(flags("text", "INFO"), stream=out)
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.WARNING
    configure_logging(flags("text", "DEBUG"), stream=out)
    assert logging.getLogger("httpx").getEffectiveLevel() == logging.INFO


def test_configure_replaces_earlier_handlers() -> None:
    first, second = io.StringIO(), io.StringIO()
    configure_logging(flags(), stream=first)
    configure_logging(flags(), stream=second)
    logging.getLogger("tradecanvas").warning("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_token_never_appears(fmt: str) -> None:
    out = io.StringIO()
    configure_logging(flags(fmt, "DEBUG"), stream=out)
    log_everything_with_the_token(logging.getLogger("tradecanvas.leaky"))
    text = out.getvalue()
    assert TOKEN not in text
    # message, bearer header, f-string, exception, dict args; JSON adds the 3 extras
    assert text.count(REDACTED) == (8 if fmt == "json" else 5)
    assert "failed with token" in text  # the rest of the message survives
    if fmt == "json":
        docs = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
        assert len(docs) == 7
        assert docs[3]["auth"] == f"Bearer {REDACTED}"
        assert docs[3]["token_copy"] == REDACTED


def test_bearer_credentials_are_redacted_even_without_a_configured_token() -> None:
    out = io.StringIO()
    configure_logging(flags(token=None), stream=out)
    logging.getLogger("x").warning("Authorization: Bearer abc.def-ghi; next")
    assert out.getvalue() == f"WARNING x: Authorization: Bearer {REDACTED}; next\n"


def test_words_after_bearer_are_not_taken_for_a_credential() -> None:
    """The 401 line says "invalid bearer token" (review: newuser2): it was logged as
    "invalid bearer <redacted>"."""
    out = io.StringIO()
    configure_logging(flags(token=None), stream=out)
    logging.getLogger("x").warning("refused: invalid bearer token; send Bearer <token>")
    assert out.getvalue() == "WARNING x: refused: invalid bearer token; send Bearer <token>\n"


def test_stderr_is_the_default_stream() -> None:
    """In a fresh interpreter: records go to stderr, nothing to stdout."""
    code = (
        "import logging; from tradecanvas.ops.logs import configure_logging;"
        "from tradecanvas.runtime_flags import build_runtime_flags;"
        f"f = build_runtime_flags({{'TRADE_CANVAS_LOG_FORMAT': 'json',"
        f" 'TRADE_CANVAS_INGEST_TOKEN': '{TOKEN}'}}).flags;"
        "configure_logging(f); logging.getLogger('t').warning('tok %s', f.ingest_token)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert proc.stdout == ""
    doc = orjson.loads(proc.stderr)
    assert doc["message"] == f"tok {REDACTED}"
    assert TOKEN not in proc.stderr


def test_a_throttled_count_logs_the_first_then_what_came_since_once_an_interval() -> None:
    count = ThrottledCount(10.0)
    assert count.add(100.0) == 1  # the first is said at once
    assert [count.add(t) for t in (101.0, 105.0, 109.9)] == [None, None, None]
    assert count.add(110.0) == 4  # the three held back and this one
    assert count.add(115.0) is None
    assert count.add(500.0) == 2


PG_SECRET = "pg-secret-4Xq"
REDIS_SECRET = "redis-secret-7Yw"


def service_flags(fmt: str) -> RuntimeFlags:
    return build_runtime_flags(
        {
            "TRADE_CANVAS_LOG_FORMAT": fmt,
            "TRADE_CANVAS_DATABASE_URL": f"postgresql://tc:{PG_SECRET}@127.0.0.1/db"
            "?sslpassword=ssl-secret-9Zz",
            "TRADE_CANVAS_REDIS_URL": f"redis://default:p%40{REDIS_SECRET}@127.0.0.1:6379/0",
        }
    ).flags


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_service_urls_passwords_never_appear(fmt: str) -> None:
    """As the ingest token: the configured passwords (as written and percent-decoded), in a
    message, its arguments, an extra field or a traceback."""
    out = io.StringIO()
    configure_logging(service_flags(fmt), stream=out)
    log = logging.getLogger("tradecanvas.leaky")
    log.info("connecting with %s", PG_SECRET)
    log.warning("auth p@%s refused", REDIS_SECRET)  # decoded, outside a URL
    log.info("sslpassword is ssl-secret-9Zz", extra={"copy": [PG_SECRET]})
    try:
        raise RuntimeError(f'password "{PG_SECRET}" refused')
    except RuntimeError:
        log.exception("exception text")
    text = out.getvalue()
    for secret in (PG_SECRET, REDIS_SECRET, "ssl-secret-9Zz"):
        assert secret not in text
    assert "connecting with <redacted>" in text and "refused" in text


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_password_of_any_url_in_a_line_is_redacted(fmt: str) -> None:
    """A URL's password that is not configured here (a short one, another service's) is
    taken out where it is a URL's; the line around it stays."""
    out = io.StringIO()
    configure_logging(flags(fmt, token=None), stream=out)
    log = logging.getLogger("tradecanvas.leaky")
    log.warning("Redis at redis://:ab@127.0.0.1:6379/0?password=qq failed, retrying")
    log.warning("('postgresql://u:s@cret@h/db', 'x')")
    text = out.getvalue()
    assert "redis://:<redacted>@127.0.0.1:6379/0?password=<redacted> failed, retrying" in text
    assert "'postgresql://u:<redacted>@h/db', 'x'" in text
    assert ":ab@" not in text and "qq" not in text and "cret" not in text
    if fmt == "json":
        assert [orjson.loads(line)["level"] for line in text.splitlines()] == ["WARNING"] * 2


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_the_time_first_and_a_file_does_not() -> None:
    """``make run`` in a terminal had no time on its lines (review: newuser2)."""
    for stream, timed in ((_Terminal(), True), (io.StringIO(), False)):
        configure_logging(flags(token=None), stream=stream)
        logging.getLogger("x").warning("hello")
        line = stream.getvalue()
        assert line.endswith("WARNING x: hello\n")
        assert bool(re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} WARNING", line)) is timed
