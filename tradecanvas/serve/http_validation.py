"""Validation of HTTP API requests (DESIGN §5), without I/O: query parameters, the write
body, the bearer token. Each refusal is a :class:`RequestRefused` carrying its status, its
error code and every :class:`Problem` found, so a client with two bad parameters learns about
both at once; ``tradecanvas.serve.http_api`` (the Starlette app) turns it into the answer.

Tokens are compared with :func:`hmac.compare_digest`; nothing here logs.
"""

from __future__ import annotations

import difflib
import hmac
import re
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Final, Protocol

import attrs
import orjson

from tradecanvas.errors import SeriesIdError
from tradecanvas.model import (
    BASE_TIMEFRAME,
    CLOCK_SKEW_S,
    Candle,
    SeriesId,
    candle_problems,
    candle_time_problem,
    shown,
)
from tradecanvas.serve.served import describe_served
from tradecanvas.serve.ws_protocol import MAX_EVENT_ID, since_problem

DEFAULT_LIMIT: Final = 500
MAX_LIMIT: Final = 5000
# Binance's /klines parameters: given here, they would be ignored without a word
_BINANCE_PARAMETERS: Final = frozenset({"symbol", "interval", "startTime", "endTime", "timeZone"})
_CANDLE_FIELDS: Final = ("candle_time", "open", "high", "low", "close", "volume")
_DECIMAL_RE: Final = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
_DECIMAL_MAX_CHARS: Final = 64
# |adjusted exponent| above this is not a price or volume; it would also store huge text
_DECIMAL_MAX_EXPONENT: Final = 30
_INT_RE: Final = re.compile(r"^-?[0-9]{1,18}$")  # always fits SQLite's 64-bit INTEGER
_EVENT_ID_RE: Final = re.compile(r"^[0-9]{1,19}$")  # then at most MAX_EVENT_ID
# candle_time above this is milliseconds (year 5138 in seconds), a common client mistake
_MAX_CANDLE_TIME: Final = 100_000_000_000
_BOUND_HELP: Final = "an integer candle_time in seconds (an exclusive bound)"
_INGEST_DISABLED_MESSAGE: Final = (
    "the write endpoint is disabled: no ingest token is configured. Set"
    " TRADE_CANVAS_INGEST_TOKEN (at least 16 characters) or give the unit a credential named"
    " ingest-token (LoadCredential=ingest-token:/etc/tradecanvas/ingest-token), then restart"
)


class QueryLike(Protocol):
    """The query string as Starlette's ``QueryParams`` gives it."""

    def get(self, key: str, /) -> str | None: ...

    def getlist(self, key: str, /) -> list[str]: ...

    def keys(self) -> Iterable[str]: ...


@attrs.frozen
class Problem:
    """One thing wrong with a request: which parameter or body field, and what."""

    field: str
    message: str

    def to_wire(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class RequestRefused(Exception):
    """A request we answer with ``status`` and an error document (:meth:`to_wire`)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        problems: tuple[Problem, ...] = (),
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.problems = problems
        self.headers = dict(headers or {})

    @classmethod
    def unprocessable(cls, problems: list[Problem], code: str = "bad_request") -> RequestRefused:
        message = "; ".join(p.message for p in problems)
        return cls(422, code, message, problems=tuple(problems))

    def to_wire(self) -> dict[str, Any]:
        """The error document: ``error``, ``message`` and, for a 422, every problem."""
        doc: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.problems:
            doc["errors"] = [p.to_wire() for p in self.problems]
        return doc


@attrs.frozen
class CandlesQuery:
    """``GET /api/market/candles``: the ``limit`` candles of ``series`` after ``since`` (the
    oldest first) or, without it, the newest ones; both exclusive bounds, with ``before``
    below (None: no bound)."""

    series: SeriesId
    since: int | None
    limit: int
    before: int | None = None


def parse_candles_query(params: QueryLike, served: frozenset[SeriesId]) -> CandlesQuery:
    """The query, or RequestRefused naming every bad part. A well-formed series that is not
    served is 404 ``unknown_series``."""
    problems = _shape(params, ("series_id", "since", "before", "limit"))
    series: SeriesId | None = None
    raw_series = params.get("series_id")
    if raw_series is None or raw_series == "":
        problems.append(
            Problem("series_id", "series_id: required, such as binance:futures:BTC/USDT:1m")
        )
    else:
        try:
            series = SeriesId.parse(raw_series)
        except SeriesIdError as exc:
            problems.append(Problem("series_id", f"series_id: {exc}"))
    since, before = _bound(params, "since", problems), _bound(params, "before", problems)
    limit = _limit(params, problems)
    if since is not None and before is not None and before <= since:
        problems.append(
            Problem("before", f"before: {before} is not above since {since} (a window's"
                    " lower bound is since, its upper bound before)")
        )  # fmt: skip
    if problems:
        raise RequestRefused.unprocessable(problems)
    assert series is not None
    if series not in served:
        raise _unknown_series(series, served)
    return CandlesQuery(series, since, limit, before)


def _bound(params: QueryLike, name: str, problems: list[Problem]) -> int | None:
    """``since`` or ``before``: a candle_time in seconds, exclusive; None when absent."""
    raw = params.get(name)
    if raw is None or raw == "":
        return None
    if not _INT_RE.match(raw):
        problems.append(Problem(name, f"{name}: {shown(raw)} is not {_BOUND_HELP}"))
        return None
    if (problem := since_problem(value := int(raw))) is not None:
        problems.append(Problem(name, f"{name}: {problem}"))
        return None
    return value


def parse_events_query(
    params: QueryLike, served: frozenset[SeriesId]
) -> tuple[int, SeriesId | None, int]:
    """``(after, series or None, limit)`` for ``GET /api/market/events``, or RequestRefused
    naming every bad part (404 ``unknown_series`` for a well-formed unserved series)."""
    problems = _shape(params, ("after", "series_id", "limit"))
    after = 0
    raw_after = params.get("after")
    if raw_after is not None and raw_after != "":
        if _EVENT_ID_RE.match(raw_after) and int(raw_after) <= MAX_EVENT_ID:
            after = int(raw_after)
        else:
            problems.append(
                Problem(
                    "after",
                    f"after: {shown(raw_after)} is not an event_id (an integer from 0 to"
                    f" {MAX_EVENT_ID}, as events_after on /ws/market; 0 for every stored event)",
                )
            )
    series: SeriesId | None = None
    raw_series = params.get("series_id")
    if raw_series:
        try:
            series = SeriesId.parse(raw_series)
        except SeriesIdError as exc:
            problems.append(Problem("series_id", f"series_id: {exc}"))
    limit = _limit(params, problems)
    if problems:
        raise RequestRefused.unprocessable(problems)
    if series is not None and series not in served:
        raise _unknown_series(series, served)
    return after, series, limit


def _shape(params: QueryLike, names: tuple[str, ...]) -> list[Problem]:
    """A problem for each parameter that looks meant for one of ``names`` — a near miss
    such as ``befor`` or ``Since``, or Binance's own kline parameters — which would
    otherwise answer a different window without a word; and for each of ``names`` given
    more than once. Other unknown parameters (a cache buster such as ``_=…``) are ignored."""
    mistaken = sorted(
        key
        for key in set(params.keys()) - set(names)
        if key in _BINANCE_PARAMETERS or difflib.get_close_matches(key.lower(), names, 1, 0.7)
    )
    named = [key if key.isidentifier() else shown(key) for key in mistaken]
    return [
        Problem(key, f"{key}: not a parameter here (they are {', '.join(names)})") for key in named
    ] + [
        Problem(name, f"{name}: given more than once")
        for name in names
        if len(params.getlist(name)) > 1
    ]


def _limit(params: QueryLike, problems: list[Problem]) -> int:
    """``limit`` (default :data:`DEFAULT_LIMIT`); a bad one is added to ``problems``."""
    raw_limit = params.get("limit")
    if raw_limit is None or raw_limit == "":
        return DEFAULT_LIMIT
    if _INT_RE.match(raw_limit) and 1 <= int(raw_limit) <= MAX_LIMIT:
        return int(raw_limit)
    problems.append(Problem("limit", f"limit: {raw_limit!r} is not an integer in 1..{MAX_LIMIT}"))
    return DEFAULT_LIMIT


def _unknown_series(series: SeriesId, served: frozenset[SeriesId]) -> RequestRefused:
    """404 ``unknown_series`` for a well-formed series this daemon does not serve."""
    what = describe_served(str(series), [str(s) for s in served])
    return RequestRefused(
        404,
        "unknown_series",
        f"series_id: {series} is not served by this daemon; {what}",
        problems=(Problem("series_id", f"{series} is not served"),),
    )


def parse_decimal(field: str, value: object) -> Decimal:
    """A JSON number or decimal string as an exact Decimal (floats via their repr).
    Raises ValueError naming ``field``."""
    if isinstance(value, bool):
        raise ValueError(f"{field}: expected a number or a decimal string, got {value!r}")
    if isinstance(value, int):
        result = Decimal(value)
    elif isinstance(value, float):
        # repr is the shortest text that round-trips: 0.1 → "0.1", not 0.1000000000000000055…
        result = Decimal(repr(value))
    elif isinstance(value, str):
        text = value.strip()
        if len(text) > _DECIMAL_MAX_CHARS or not _DECIMAL_RE.match(text):
            raise ValueError(f"{field}: {value!r} is not a decimal number")
        result = Decimal(text)
    else:
        raise ValueError(f"{field}: expected a number or a decimal string, got {value!r}")
    if not result.is_finite():
        raise ValueError(f"{field}: {value!r} is not a finite number")
    if result == 0:
        return Decimal(0)
    if abs(result.adjusted()) > _DECIMAL_MAX_EXPONENT:
        raise ValueError(
            f"{field}: {value!r} is out of range (magnitude 1e±{_DECIMAL_MAX_EXPONENT})"
        )
    return result


def parse_candle_time(value: object) -> int:
    """``candle.candle_time`` of a write: an integer of seconds. Raises ValueError."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"candle.candle_time: expected an integer (the bar's open time in unix seconds),"
            f" got {value!r}"
        )
    if value < 0:
        raise ValueError(f"candle.candle_time: must not be negative, got {value}")
    if value >= _MAX_CANDLE_TIME:
        raise ValueError(
            f"candle.candle_time: {value} is too large; it is in seconds, not milliseconds"
        )
    return value


def _check_closed(candle_time: int, now: float) -> None:
    closes = candle_time + BASE_TIMEFRAME.seconds
    if closes > now + CLOCK_SKEW_S:
        raise ValueError(
            f"candle.candle_time: {candle_time} ({_utc(candle_time)}) closes at"
            f" {_utc(closes)}, after now ({_utc(int(now))} by this daemon's clock): only"
            " closed candles are written"
        )


def _utc(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def parse_ingest_body(
    raw: bytes, writable: frozenset[SeriesId], *, now: float
) -> tuple[SeriesId, Candle]:
    """The write body ``{series_id, candle: {candle_time, open, high, low, close, volume}}``.

    Raises RequestRefused (422) naming every bad field; the candle's own rules (alignment to
    1m, high ≥ low, prices within [low, high], non-negative volume) are checked last. A
    closed candle has closed: one that closes after ``now`` (the wall clock, unix seconds)
    plus :data:`CLOCK_SKEW_S` is refused — stored, it would be the series' head, and every
    live minute after it would be a revision below it.
    """
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RequestRefused.unprocessable(
            [Problem("body", f"body: not valid JSON ({exc})")]
        ) from None
    if not isinstance(doc, dict):
        raise RequestRefused.unprocessable(
            [Problem("body", f"body: expected a JSON object, got {type(doc).__name__}")]
        )
    problems: list[Problem] = []
    unknown = sorted(set(doc) - {"series_id", "candle"})
    if unknown:
        problems.append(Problem("body", f"body: unknown field(s) {', '.join(unknown)}"))
    series: SeriesId | None = None
    if "series_id" not in doc:
        problems.append(Problem("series_id", "series_id: required"))
    else:
        try:
            series = SeriesId.parse(doc["series_id"])
        except SeriesIdError as exc:
            problems.append(Problem("series_id", f"series_id: {exc}"))
    values: dict[str, Any] = {}
    raw_candle = doc.get("candle")
    if "candle" not in doc:
        problems.append(
            Problem("candle", "candle: required, an object with " + ", ".join(_CANDLE_FIELDS))
        )
    elif not isinstance(raw_candle, dict):
        problems.append(Problem("candle", f"candle: expected an object, got {raw_candle!r}"))
    else:
        extra = sorted(set(raw_candle) - set(_CANDLE_FIELDS))
        if extra:
            problems.append(Problem("candle", f"candle: unknown field(s) {', '.join(extra)}"))
        for name in _CANDLE_FIELDS:
            field = f"candle.{name}"
            if name not in raw_candle:
                problems.append(Problem(field, f"{field}: required"))
                continue
            try:
                if name == "candle_time":
                    values[name] = parse_candle_time(raw_candle[name])
                    _check_closed(values[name], now)
                else:
                    values[name] = parse_decimal(field, raw_candle[name])
            except ValueError as exc:
                problems.append(Problem(field, str(exc)))
        problems += _value_problems(values)
    if series is not None and series not in writable:
        if series.timeframe != BASE_TIMEFRAME:
            message = (
                f"series_id: {series} is not a base 1m series; only base 1m series accept"
                " writes (higher timeframes are derived from them)"
            )
            problems.append(Problem("series_id", message))
        elif not problems:
            raise RequestRefused.unprocessable(
                [Problem("series_id", f"series_id: {series} is not served by this daemon")],
                code="unknown_series",
            )
        else:
            problems.append(
                Problem("series_id", f"series_id: {series} is not served by this daemon")
            )
    if problems:
        raise RequestRefused.unprocessable(problems)
    assert series is not None
    return series, Candle(**values)


def _value_problems(values: dict[str, Any]) -> list[Problem]:
    """The rules between a candle's values, each parsed on its own (high and low, the
    range, signs), and its time's alignment: every one broken, under its field. With a value
    missing, only the time's."""
    if len(values) == len(_CANDLE_FIELDS):
        wrong = candle_problems(Candle(**values), BASE_TIMEFRAME)
    elif "candle_time" in values:
        time_problem = candle_time_problem(values["candle_time"], BASE_TIMEFRAME)
        wrong = [] if time_problem is None else [("candle_time", time_problem)]
    else:
        wrong = []
    return [Problem(f"candle.{name}", f"candle.{name}: {message}") for name, message in wrong]


def check_bearer(authorization: str | None, token: str | None) -> None:
    """Refuse unless ``authorization`` is ``Bearer <token>``. 403 when no token is set."""
    if token is None:
        raise RequestRefused(403, "ingest_disabled", _INGEST_DISABLED_MESSAGE)
    challenge = 'Bearer realm="tradecanvas"'
    if not authorization:
        raise RequestRefused(
            401,
            "unauthorized",
            "missing Authorization: Bearer <token> header",
            headers={"WWW-Authenticate": challenge},
        )
    scheme, _, given = authorization.strip().partition(" ")
    # compare_digest takes the same time whatever prefix matches; bytes so that non-ASCII
    # input is compared rather than raising
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        given.strip().encode("utf-8", "surrogateescape"), token.encode("utf-8")
    ):
        raise RequestRefused(
            401,
            "unauthorized",
            "invalid bearer token",
            headers={"WWW-Authenticate": f'{challenge}, error="invalid_token"'},
        )


__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "CandlesQuery",
    "Problem",
    "QueryLike",
    "RequestRefused",
    "check_bearer",
    "parse_candle_time",
    "parse_candles_query",
    "parse_decimal",
    "parse_ingest_body",
]
