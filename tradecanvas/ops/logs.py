"""Logging to stderr for journald: one line per record, text or JSON (DESIGN §7).

``configure_logging(flags)`` installs a single stderr handler on the root logger, at
``TRADE_CANVAS_LOG_LEVEL``, formatting each record as a text line or as one JSON object
(``TRADE_CANVAS_LOG_FORMAT=json``, encoded with orjson). journald adds the timestamp, the
unit and the PID, so the text line carries only level, logger and message.

The ingest token and the passwords of the service URLs must never reach a log line. Nothing
of ours logs them (a URL is logged as ``url_without_password`` gives it), and two guards make
sure of it anyway: :class:`RedactingFilter` rewrites every record that reaches the handler
(message, arguments, exception text) and the formatters redact their final output, both
replacing the configured token, the passwords of ``TRADE_CANVAS_DATABASE_URL`` and
``TRADE_CANVAS_REDIS_URL``, the password of any URL in the text and anything that looks like
a bearer credential.
"""

from __future__ import annotations

import logging
import math
import re
import sys
import traceback
from datetime import UTC, datetime
from typing import IO, Any, Final, final

import orjson

from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.service_urls import url_secrets, url_without_password

REDACTED: Final = "<redacted>"
TEXT_FORMAT: Final = "%(levelname)s %(name)s: %(message)s"
# on a terminal (``make run``, the README's tour) each line starts with the time: journald
# and the files tests read keep the plain format (journald stamps every line itself)
TERMINAL_FORMAT: Final = "%(asctime)s " + TEXT_FORMAT
# ``Authorization: Bearer abc.def-ghi`` or ``bearer=…`` anywhere in a line: not ours to
# print. Eight characters or more: words ("invalid bearer token", "Bearer <token>") are
# not credentials, and a configured token is 16 or more (and redacted as itself anyway)
_BEARER_RE: Final = re.compile(r"(?i)(bearer[\s=:]+)[^\s\"',;]{8,}")
# a URL in a line, up to a space or a quote (a JSON line's next field is not part of it)
_URL_RE: Final = re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://[^\s\"'\\]+")
# a configured secret shorter than this is replaced only where it is a URL's password: as a
# plain string it would take every such word out of the lines
MIN_SECRET_CHARS: Final = 4
# Chatty third-party loggers: httpx logs every request at INFO (one per REST backfill page),
# Hypercorn says "Running on … (CTRL + C to quit)" (the HTTP API logs its own line)
_QUIET_LOGGERS: Final = (
    "httpx",
    "httpcore",
    "hpack",
    "trio-websocket",
    "hypercorn.access",
    "hypercorn.error",
)
# LogRecord's own attributes; anything else on a record came from ``extra=`` and goes to JSON
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__.keys() | {"message", "asctime"}
)


class Redactor:
    """Removes the configured secrets (the ingest token, the service URLs' passwords: of
    :data:`MIN_SECRET_CHARS` or more), the password of any URL and bearer credentials from
    text."""

    def __init__(self, *secrets: str | None) -> None:
        kept = {s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}
        kept |= {orjson.dumps(s).decode()[1:-1] for s in kept}  # as a JSON line writes it
        # the longest first: a secret holding another is replaced whole
        self._secrets = sorted(kept, key=len, reverse=True)

    @classmethod
    def of_flags(cls, flags: RuntimeFlags) -> Redactor:
        return cls(
            flags.ingest_token, *url_secrets(flags.database_url), *url_secrets(flags.redis_url)
        )

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, REDACTED)
        if "://" in text:
            text = _URL_RE.sub(lambda url: url_without_password(url.group(), in_text=True), text)
        return _BEARER_RE.sub(rf"\g<1>{REDACTED}", text)


class RedactingFilter(logging.Filter):
    """A handler filter that renders each record's message and exception text redacted.

    Installed on the handler (not a logger), so it sees records propagated from every
    logger. It never drops a record.
    """

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = f"{record.msg!r} % {record.args!r}"
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and record.exc_info[0] is None:
            # exc_info=True with no exception (coredis does so on a closed connection):
            # nothing to show, where logging would print a line "NoneType: None"
            record.exc_info = None
        if record.exc_info and not record.exc_text:
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip()
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


class TextFormatter(logging.Formatter):
    """``LEVEL logger: message`` (plus the traceback), redacted once more at the end;
    ``timed``: after the local time (``2026-12-05 08:40:12,345``)."""

    def __init__(self, redact: Redactor, *, timed: bool = False) -> None:
        super().__init__(TERMINAL_FORMAT if timed else TEXT_FORMAT)
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        return self.redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC ISO 8601), ``level``, ``logger``, ``message``,
    ``exc_info`` when there is a traceback, and every ``extra=`` field (non-JSON values as
    their ``str``). The encoded line is redacted once more at the end."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exc_info"] = record.exc_text
        if record.stack_info:
            doc["stack_info"] = record.stack_info
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRS and key not in doc and not key.startswith("_"):
                doc[key] = value
        line = orjson.dumps(doc, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        return self.redact(line)


@final
class ThrottledCount:
    """Events logged in one line at most every ``interval_s`` (a flood of them would be a flood
    of lines): :meth:`add` counts one and returns how many came since the last line when a
    line is due now, else None."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._unlogged = 0
        self._next_at = -math.inf

    def add(self, now: float) -> int | None:
        self._unlogged += 1
        if now < self._next_at:
            return None
        count, self._unlogged = self._unlogged, 0
        self._next_at = now + self.interval_s
        return count


def build_handler(flags: RuntimeFlags, stream: IO[str] | None = None) -> logging.Handler:
    """The stderr handler ``configure_logging`` installs (``stream`` for tests)."""
    redact = Redactor.of_flags(flags)
    out = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(out)
    formatter: logging.Formatter = (
        JsonFormatter(redact)
        if flags.log_format == "json"
        else TextFormatter(redact, timed=_is_terminal(out))
    )
    handler.setFormatter(formatter)
    handler.addFilter(RedactingFilter(redact))
    return handler


def _is_terminal(out: IO[str]) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def configure_logging(flags: RuntimeFlags, *, stream: IO[str] | None = None) -> None:
    """Send every log record to stderr (or ``stream``) in the configured format and level.

    Replaces whatever handlers the root logger had (the CLI's early ``basicConfig``).
    """
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(build_handler(flags, stream))
    level: int = logging.getLevelNamesMapping()[flags.log_level]
    root.setLevel(level)
    # their per-request INFO lines only help when debugging
    quiet = logging.INFO if level <= logging.DEBUG else max(level, logging.WARNING)
    for name in _QUIET_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
