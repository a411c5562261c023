"""The HTTP API (DESIGN §5): a Starlette app served by Hypercorn's trio worker.

Routes::

    GET  /api/market/candles?series_id=&since=&limit=   read closed candles
    POST /api/market/ingest/candle_closed               the strict write path (bearer token)
    GET  /api/market/series                             served series, head time, freshness
    GET  /healthz                                       the process is alive
    GET  /readyz                                        store open, listeners bound, upstream
    GET  /metrics                                       Prometheus text exposition

Every answer is JSON except ``/metrics``. An error is ``{"error": code, "message": text}``;
a 422 also lists every problem found as ``errors: [{"field", "message"}]``, so a client
with two bad parameters learns about both at once. Codes:

=====  ===================  ======================================================
 401   ``unauthorized``     missing or wrong bearer token (``WWW-Authenticate: Bearer``)
 403   ``ingest_disabled``  no ingest token configured: the write endpoint is refused
 404   ``unknown_series``   GET for a well-formed series this daemon does not serve
 404   ``not_found``        no such route (405 ``method_not_allowed`` for a wrong method)
 413   ``body_too_large``   a write body over 1 MiB
 422   ``bad_request``      a bad parameter or body (a well-formed but unserved series in
                            a write body is 422 ``unknown_series``: the URL exists, the
                            body names something that does not)
 500   ``ingest_failed``    the store refused the write (nothing was committed)
 500   ``store_failed``     the store could not be read
 503   ``publish_failed``   committed, but a subscriber delivery failed (they heal from the
                            store); the body says ``"committed": true``
 503   ``not_ready``        ``/readyz`` with a failing check
=====  ===================  ======================================================

The write path never logs the Authorization header or the token, and compares tokens
with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import contextlib
import hmac
import logging
import re
import time
from collections.abc import Callable, Mapping
from decimal import Decimal
from typing import Any, Final

import attrs
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from tradecanvas.errors import CandleError, PublishError, SeriesIdError, StoreError
from tradecanvas.model import Candle, SeriesId, Timeframe, validate_candle
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline import IngestBatch, IngestPipeline
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.store.sqlite import CandleStore

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1 << 20  # 1 MiB: one candle is ~200 bytes; anything near this is abuse
DEFAULT_LIMIT: Final = 500
MAX_LIMIT: Final = 5000
BASE_TIMEFRAME: Final = Timeframe.parse("1m")
_CANDLE_FIELDS: Final = ("candle_time", "open", "high", "low", "close", "volume")
_DECIMAL_RE: Final = re.compile(r"^[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$")
_DECIMAL_MAX_CHARS: Final = 64
# |adjusted exponent| above this is not a price or volume; it would also store huge text
_DECIMAL_MAX_EXPONENT: Final = 30
_INT_RE: Final = re.compile(r"^-?[0-9]{1,18}$")  # always fits SQLite's 64-bit INTEGER
# candle_time above this is milliseconds (year 5138 in seconds), a common client mistake
_MAX_CANDLE_TIME: Final = 100_000_000_000
_SINCE_HELP: Final = "an integer candle_time in seconds (exclusive cursor)"
_INGEST_DISABLED_MESSAGE: Final = (
    "the write endpoint is disabled: no ingest token is configured. Set"
    " TRADE_CANVAS_INGEST_TOKEN (at least 16 characters) or give the unit a credential named"
    " ingest-token (LoadCredential=ingest-token:/etc/tradecanvas/ingest-token), then restart"
)


class JsonResponse(Response):
    """JSON encoded with orjson (Decimals are never passed in; candles are floats)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


@attrs.frozen
class Problem:
    """One thing wrong with a request: which parameter or body field, and what."""

    field: str
    message: str

    def to_wire(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class RequestRefused(Exception):
    """Raised inside a handler to answer with an error document."""

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

    def response(self) -> JsonResponse:
        body: dict[str, Any] = {"error": self.code, "message": self.message}
        if self.problems:
            body["errors"] = [p.to_wire() for p in self.problems]
        return JsonResponse(body, status_code=self.status, headers=self.headers)


# --- validation (plain functions: no I/O) ----------------------------------------------


def parse_candles_query(
    params: QueryParams, served: frozenset[SeriesId]
) -> tuple[SeriesId, int | None, int]:
    """``(series, since, limit)`` from the query, or RequestRefused naming every bad part.

    A well-formed series that is not served is 404 ``unknown_series``.
    """
    problems: list[Problem] = []
    for name in ("series_id", "since", "limit"):
        if len(params.getlist(name)) > 1:
            problems.append(Problem(name, f"{name}: given more than once"))
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
    since: int | None = None
    raw_since = params.get("since")
    if raw_since is not None and raw_since != "":
        if _INT_RE.match(raw_since):
            since = int(raw_since)
        else:
            problems.append(Problem("since", f"since: {raw_since!r} is not {_SINCE_HELP}"))
    limit = DEFAULT_LIMIT
    raw_limit = params.get("limit")
    if raw_limit is not None and raw_limit != "":
        if _INT_RE.match(raw_limit) and 1 <= int(raw_limit) <= MAX_LIMIT:
            limit = int(raw_limit)
        else:
            problems.append(
                Problem("limit", f"limit: {raw_limit!r} is not an integer in 1..{MAX_LIMIT}")
            )
    if problems:
        raise RequestRefused.unprocessable(problems)
    assert series is not None
    if series not in served:
        raise RequestRefused(
            404,
            "unknown_series",
            f"series_id: {series} is not served by this daemon; GET /api/market/series lists"
            " the served ones",
            problems=(Problem("series_id", f"{series} is not served"),),
        )
    return series, since, limit


def parse_decimal(field: str, value: object) -> Decimal:
    """A JSON number or decimal string as an exact Decimal (floats via their repr)."""
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


def parse_ingest_body(raw: bytes, writable: frozenset[SeriesId]) -> tuple[SeriesId, Candle]:
    """The write body ``{series_id, candle: {candle_time, open, high, low, close, volume}}``.

    Raises RequestRefused (422) naming every bad field; the candle's own rules (alignment to
    1m, high ≥ low, prices within [low, high], non-negative volume) are checked last.
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
                else:
                    values[name] = parse_decimal(field, raw_candle[name])
            except ValueError as exc:
                problems.append(Problem(field, str(exc)))
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
    candle = Candle(**values)
    try:
        validate_candle(candle, BASE_TIMEFRAME)
    except CandleError as exc:
        raise RequestRefused.unprocessable([Problem("candle", f"candle: {exc}")]) from None
    return series, candle


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


async def read_body_limited(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes: by Content-Length
    before reading, and by counting the streamed bytes (chunked bodies have no length)."""
    too_large = RequestRefused(413, "body_too_large", f"body: larger than the {limit} byte limit")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        async with contextlib.aclosing(request.stream()) as stream:
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except ClientDisconnect:
        raise RequestRefused(400, "bad_request", "body: the client went away") from None
    return b"".join(chunks)


# --- the app -------------------------------------------------------------------------------


def build_http_app(
    *,
    store: CandleStore,
    pipeline: IngestPipeline,
    flags: RuntimeFlags,
    metrics: Metrics,
    readiness: Callable[[], Mapping[str, bool]],
    clock: Callable[[], float] = time.time,
) -> Starlette:
    """The Starlette app for DESIGN §5. ``readiness()`` names each readiness check (e.g.
    ``listeners_bound``, ``upstream_connected``) with its state; ``store_open`` is added
    here. ``clock`` is the wall clock for ``lag_seconds`` (freshness is a wall-clock
    notion; nothing else here reads it)."""
    served: frozenset[SeriesId] = frozenset(flags.all_series())
    writable: frozenset[SeriesId] = frozenset(flags.series)
    base_of = {
        d: b
        for b in flags.series
        for d in (b, *(b.with_timeframe(t) for t in flags.derived_timeframes))
    }

    async def candles(request: Request) -> Response:
        series, since, limit = parse_candles_query(request.query_params, served)
        sid = str(series)
        try:
            if since is None:
                rows = await store.tail(sid, limit)
            else:
                rows = await store.since(sid, since, limit)
            # read after the candles, so the head is never below the last candle returned
            head = await store.head_time(sid)
        except StoreError as exc:
            log.error("GET candles %s: %s", sid, exc)
            raise RequestRefused(500, "store_failed", f"the candle store failed: {exc}") from None
        return JsonResponse(
            {
                "series_id": sid,
                "server_head_time": head,
                "candles": [c.to_wire() for c in rows],
            }
        )

    async def ingest_candle_closed(request: Request) -> Response:
        check_bearer(request.headers.get("authorization"), flags.ingest_token)
        body = await read_body_limited(request)
        series, candle = parse_ingest_body(body, writable)
        sid = str(series)
        try:
            result = await pipeline.run(IngestBatch.of(series, [candle], "http"))
        except StoreError as exc:
            log.error("HTTP ingest of %s at %d failed: %s", sid, candle.candle_time, exc)
            raise RequestRefused(
                500,
                "ingest_failed",
                f"the candle store refused the write; nothing was committed: {exc}",
            ) from None
        metrics.candles_committed_total.inc(result.committed)
        metrics.publish_total.labels(path="http").inc()
        try:
            pipeline.publish(result, best_effort=False)
        except PublishError as exc:
            metrics.publish_failed_steps_total.labels(path="http").inc()
            log.warning("HTTP ingest of %s at %d: %s", sid, candle.candle_time, exc)
            return JsonResponse(
                {
                    "error": "publish_failed",
                    "message": (
                        f"the candle is committed, but publishing it failed ({exc}); the"
                        " affected subscribers were disconnected and heal from the store"
                    ),
                    "committed": True,
                    "series_id": sid,
                    "candle_time": candle.candle_time,
                    "failures": exc.failures,
                },
                status_code=503,
            )
        return JsonResponse(
            {
                "ok": True,
                "series_id": sid,
                "candle_time": candle.candle_time,
                "committed": result.committed,
            }
        )

    async def series_list(request: Request) -> Response:
        try:
            heads = await store.heads()
        except StoreError as exc:
            log.error("GET series: %s", exc)
            raise RequestRefused(500, "store_failed", f"the candle store failed: {exc}") from None
        now = clock()
        out: list[dict[str, Any]] = []
        for series in flags.all_series():
            sid = str(series)
            head = heads.get(sid)
            lag: float | None = None
            if head is not None:
                # seconds since the newest stored bar closed (its open time + its length)
                lag = round(max(0.0, now - (head.head_time + series.timeframe.seconds)), 3)
            out.append(
                {
                    "series_id": sid,
                    "kind": "base" if series in writable else "derived",
                    "base_series_id": str(base_of[series]),
                    "timeframe": series.timeframe.text,
                    "head_time": None if head is None else head.head_time,
                    "first_time": None if head is None else head.first_time,
                    "candles": 0 if head is None else head.count,
                    "lag_seconds": lag,
                }
            )
        return JsonResponse({"series": out})

    async def healthz(request: Request) -> Response:
        return JsonResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, bool] = {"store_open": not store.closed}
        try:
            checks.update((str(k), bool(v)) for k, v in readiness().items())
        except Exception:
            log.exception("readiness check raised")
            checks["readiness_check"] = False
        ready = all(checks.values())
        body: dict[str, Any] = {"ready": ready, "checks": checks}
        if not ready:
            failing = sorted(k for k, v in checks.items() if not v)
            body.update(error="not_ready", message="not ready: " + ", ".join(failing))
        return JsonResponse(body, status_code=200 if ready else 503)

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestRefused)
        return exc.response()

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JsonResponse(
            {"error": code, "message": f"{exc.detail}: {request.method} {request.url.path}"},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    routes = [
        Route("/api/market/candles", candles, methods=["GET"]),
        Route("/api/market/ingest/candle_closed", ingest_candle_closed, methods=["POST"]),
        Route("/api/market/series", series_list, methods=["GET"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={RequestRefused: refused, HTTPException: http_error},
    )
