"""The HTTP API (DESIGN §5): a Starlette app served by Hypercorn's trio worker.

Routes::

    GET  /api/market/candles?series_id=&since=&limit=   read closed candles
    POST /api/market/ingest/candle_closed               the strict write path (bearer token)
    GET  /api/market/series                             served series, head time, freshness
    GET  /healthz?series_id=                            the process is alive (and what it
                                                        knows of Binance: of the connection
                                                        carrying that series, for the chart
                                                        page; ``upstream_view``)
    GET  /readyz                                        store open, listeners bound, upstream
    GET  /metrics                                       Prometheus text exposition
    WS   /ws/market                                     the subscriber protocol (``ws_asgi``),
                                                        when the app is given the endpoint

Every answer is JSON except ``/metrics``. An error is ``{"error": code, "message": text}``;
a 422 also lists every problem found as ``errors: [{"field", "message"}]``, so a client
with two bad parameters learns about both at once. Codes:

=====  ===================  ======================================================
 401   ``unauthorized``     missing or wrong bearer token (``WWW-Authenticate: Bearer``)
 403   ``ingest_disabled``  no ingest token configured: the write endpoint is refused
 408   ``body_timeout``     a write body not received in full within
                            ``http_body_timeout_s`` of its headers (the connection closes)
 404   ``unknown_series``   GET for a well-formed series this daemon does not serve
 404   ``not_found``        no such route (405 ``method_not_allowed`` for a wrong method)
 413   ``body_too_large``   a write body over 1 MiB
 422   ``bad_request``      a bad parameter or body (a well-formed but unserved series in
                            a write body is 422 ``unknown_series``: the URL exists, the
                            body names something that does not)
 500   ``ingest_failed``    the store refused the write (nothing was committed)
 500   ``store_failed``     the store could not be read
 503   ``publish_failed``   committed, but queueing for a subscriber failed (it is closed
                            with 1011 and heals from the store; a client gone is no failure);
                            the body says ``"committed": true``
 503   ``not_ready``        ``/readyz`` with a failing check
 503   ``busy``             every candle/event read slot taken and the queue full
                            (``Retry-After: 1``; ``tradecanvas.serve.read_slots``)
=====  ===================  ======================================================

A store failure's answer says no more than that (the exception's text, a table's name, is
in the daemon's log: a 500 ``store_failed`` at ERROR once a minute at most, with how many
came). Every JSON answer carries ``X-Content-Type-Options: nosniff``.

The API's GET answers of ``GZIP_MIN_BYTES`` or more go gzip-compressed to a client that
accepts it (a page of candles shrinks to about a fifth); the chart page's files are
compressed once, when the app is built (``chart_page``).

The request validation (every 401/403/404/422 above) is plain functions in
``tradecanvas.serve.http_validation``; this module reads bodies, calls the store and the
pipeline and answers. The write path never logs the Authorization header or the token.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any, Final

import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from tradecanvas.errors import PublishError, SeriesIdError, StoreError, StoreUnreachable
from tradecanvas.ingest.supervisor import ConnectionState
from tradecanvas.model import SeriesId
from tradecanvas.ops.logs import ThrottledCount
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.serve.chart_page import chart_page_routes
from tradecanvas.serve.http_validation import (
    RequestRefused,
    check_bearer,
    parse_candles_query,
    parse_events_query,
    parse_ingest_body,
)
from tradecanvas.serve.read_slots import ReadSlots
from tradecanvas.serve.upstream_view import connection_counts, series_upstream
from tradecanvas.serve.ws_asgi import market_websocket_routes
from tradecanvas.serve.ws_session import MarketEndpoint
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.types import StoredCandle

log = logging.getLogger(__name__)

MAX_BODY_BYTES: Final = 1 << 20  # 1 MiB: one candle is ~200 bytes; anything near this is abuse
# smaller answers (an error, /healthz) gain little and cost a compression each
GZIP_MIN_BYTES: Final = 1024
# zlib's default: a page of 5,000 real 1m candles (535 kB of JSON) becomes 95 kB in 14 ms,
# at 9 93 kB in 36 ms; bodies over 128 KiB are compressed in a worker thread
GZIP_LEVEL: Final = 6
# refused writes (401) are logged in one line a minute at most, with how many came
REFUSED_WRITE_LOG_S: Final = 60.0
# failed store reads (an outage: every request fails) likewise
STORE_FAILED_LOG_S: Final = 60.0
# what a client is told of a failed store read or write: the details are in the log
STORE_FAILED_MESSAGE: Final = "the candle store failed; see the daemon's log"
INGEST_FAILED_MESSAGE: Final = (
    "the candle store refused the write; nothing was committed; see the daemon's log"
)
# on every JSON answer (and /metrics): a browser never takes one for a page or a script
NOSNIFF_HEADERS: Final = {"X-Content-Type-Options": "nosniff"}


class JsonResponse(Response):
    """JSON encoded with orjson (Decimals are never passed in; candles are floats)."""

    media_type = "application/json"

    def __init__(
        self, content: Any, status_code: int = 200, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(content, status_code, {**(headers or {}), **NOSNIFF_HEADERS})

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content)


async def read_body_limited(
    request: Request, timeout_s: float, limit: int = MAX_BODY_BYTES
) -> bytes:
    """The request body, refusing (413) anything over ``limit`` bytes: by Content-Length
    before reading, and by counting the streamed bytes (chunked bodies have no length); and
    (408) a body not received in full within ``timeout_s`` — the whole body, however it
    trickles in (Hypercorn's own timeouts end only idle connections and silent reads). The
    408 closes the connection: the rest of the body is never read."""
    too_large = RequestRefused(413, "body_too_large", f"body: larger than the {limit} byte limit")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    with trio.move_on_after(timeout_s) as deadline:
        try:
            async with contextlib.aclosing(request.stream()) as stream:
                async for chunk in stream:
                    size += len(chunk)
                    if size > limit:
                        raise too_large
                    chunks.append(chunk)
        except ClientDisconnect:
            raise RequestRefused(400, "bad_request", "body: the client went away") from None
    if deadline.cancelled_caught:
        raise RequestRefused(
            408,
            "body_timeout",
            f"body: not received in full within {timeout_s:g}s ({size} bytes came)",
            headers={"connection": "close"},
        )
    return b"".join(chunks)


# --- the app -------------------------------------------------------------------------------


def _wire(row: StoredCandle) -> dict[str, int | float | bool]:
    """A candle as HTTP gives it; a derived bar some of whose minutes are missing (at the
    exchange, or not stored yet) says so with ``complete: false``."""
    wire: dict[str, int | float | bool] = dict(row.candle.to_wire())
    if not row.complete:
        wire["complete"] = False
    return wire


def build_http_app(
    *,
    store: MarketStore,
    pipeline: IngestPipeline,
    flags: RuntimeFlags,
    metrics: Metrics,
    readiness: Callable[[], Mapping[str, bool]],
    about: Callable[[], Mapping[str, Any]] = dict,
    connections: Callable[[], Sequence[ConnectionState] | None] = lambda: None,
    clock: Callable[[], float] = time.time,
    market: MarketEndpoint | None = None,
    reads: ReadSlots | None = None,
) -> Starlette:
    """The Starlette app for DESIGN §5. ``readiness()`` names each readiness check (e.g.
        ``listeners_bound``, ``upstream_connected``) with its state; ``store_open`` is added
        here; ``about()`` adds fields to /readyz's body that are not checks (an edge's ``ingest``).
    ``connections()`` are the Binance connections behind ``upstream_connected`` (or behind an
    edge's ``ingest`` report; None when not told), for /healthz's per-series answer.
        ``clock`` is the wall clock for ``lag_seconds`` (freshness is a wall-clock
        notion; nothing else here reads it). With ``market``, /ws/market is served here too
        (DESIGN §10, one origin), by the same endpoint as on the WS port. ``reads`` bounds the
        candle and event reads running at once (``tradecanvas.serve.read_slots``)."""
    slots = ReadSlots() if reads is None else reads
    refused_writes = ThrottledCount(REFUSED_WRITE_LOG_S)
    failed_reads = ThrottledCount(STORE_FAILED_LOG_S)
    served: frozenset[SeriesId] = frozenset(flags.all_series())
    writable: frozenset[SeriesId] = frozenset(flags.series)
    base_of = {
        d: b
        for b in flags.series
        for d in (b, *(b.with_timeframe(t) for t in flags.derived_timeframes))
    }

    def store_failed(what: str, exc: StoreError) -> RequestRefused:
        """500 ``store_failed`` saying nothing of the failure, which is logged (throttled)."""
        count = failed_reads.add(time.monotonic())
        if count is not None:  # an outage the store's own lines report: a warning
            level = logging.WARNING if isinstance(exc, StoreUnreachable) else logging.ERROR
            log.log(
                level,
                "GET %s: %s (%d failed store read(s) since the last such line)",
                what,
                exc,
                count,
            )
        return RequestRefused(500, "store_failed", STORE_FAILED_MESSAGE)

    @contextlib.asynccontextmanager
    async def store_read(what: str) -> AsyncIterator[None]:
        """A read slot for a read and its encoding (up to 5,000 rows); a store failure is
        500 ``store_failed``, logged with ``what``."""
        async with slots.slot():
            try:
                yield
            except StoreError as exc:
                raise store_failed(what, exc) from None

    async def candles(request: Request) -> Response:
        query = parse_candles_query(request.query_params, served)
        sid, since, before, limit = str(query.series), query.since, query.before, query.limit
        async with store_read(f"candles {sid}"):
            rows = await store.window(sid, since, before, limit)
            # read after the candles, so the head is never below the last candle returned
            head = await store.head_time(sid)
            return JsonResponse(
                {
                    "series_id": sid,
                    "server_head_time": head,
                    "candles": [_wire(r) for r in rows],
                }
            )

    async def events(request: Request) -> Response:
        after, series, limit = parse_events_query(request.query_params, served)
        series_ids = None if series is None else [str(series)]
        async with store_read(f"events after {after}"):
            # the prune mark first: an event pruned after it was read is still in the read
            pruned_upto = await store.events_pruned_upto()
            stored = await store.events_after(after, series_ids, limit)
            # a cursor above every id this log gave comes from another log (a restored
            # backup): start over from its newest
            newest = after if stored else await store.events_newest_id()
            return JsonResponse(
                {
                    "after": after,
                    "series_id": None if series is None else str(series),
                    "events": [SystemEvent.from_stored(s).to_wire() for s in stored],
                    "next_after": stored[-1].event_id if stored else min(after, newest),
                    "more": len(stored) == limit,
                    "pruned_upto": pruned_upto,
                    "truncated": after < pruned_upto or after > newest,
                }
            )

    async def ingest_candle_closed(request: Request) -> Response:
        try:
            check_bearer(request.headers.get("authorization"), flags.ingest_token)
        except RequestRefused as refused:
            # a wrong token is a misconfigured writer or someone guessing: on the record,
            # one line a minute at most however many come
            count = refused_writes.add(time.monotonic()) if refused.status == 401 else None
            if count is not None:
                log.warning(
                    "HTTP write refused from %s: %s (%d refused since the last such line)",
                    request.client.host if request.client else "?",
                    refused.message,
                    count,
                )
            raise
        body = await read_body_limited(request, flags.http_body_timeout_s)
        series, candle = parse_ingest_body(body, writable, now=clock())
        sid = str(series)
        try:
            result = await pipeline.run(IngestBatch.of(series, [candle], "http"))
        except StoreError as exc:
            log.error("HTTP ingest of %s at %d failed: %s", sid, candle.candle_time, exc)
            raise RequestRefused(500, "ingest_failed", INGEST_FAILED_MESSAGE) from None
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
        # a write changes what every chart shows: each accepted one is on the record
        log.info(
            "HTTP write from %s: %s at %d (%d row(s) committed)",
            request.client.host if request.client else "?",
            sid,
            candle.candle_time,
            result.committed,
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
            raise store_failed("series", exc) from None
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

    def upstream() -> str | None:
        """What this node knows of the market's source, for the chart page (docs/chart.md):
        ``connected`` / ``disconnected`` (its own Binance connections, or on an edge what the
        ingest node holding the lease reports), ``no_ingest`` (an edge: no node holds the
        lease), None when it does not know (a standby, an edge before its first read)."""
        try:
            checks, extra = readiness(), about()
        except Exception:
            return None  # /readyz logs it
        connected = checks.get("upstream_connected")
        if connected is None and "ingest" in extra:
            report = extra["ingest"]
            if report is None:
                return "no_ingest"
            connected = report.get("upstream_connected")
        if not isinstance(connected, bool):
            return None
        return "connected" if connected else "disconnected"

    def served_series(raw: str) -> SeriesId | None:
        """The served series ``raw`` names, or None (not a series id, or not served here)."""
        try:
            series = SeriesId.parse(raw)
        except SeriesIdError:
            return None
        return series if series in served else None

    async def healthz(request: Request) -> Response:
        # always 200: a liveness probe; `upstream` is for the chart page, which polls it
        # with its series (/readyz names the lease holder and is kept off a public proxy).
        # A series_id that is not a served series is answered null, never refused: the
        # probe stays a probe whatever a page or a person adds to it
        whole = upstream()
        try:
            known = connections()
        except Exception:
            known = None  # as readiness() failing: not known (/readyz logs what fails)
        body: dict[str, Any] = {
            "status": "ok",
            "upstream": whole,
            "connections": connection_counts(whole, known),
        }
        raw = request.query_params.get("series_id")
        if raw:
            series = served_series(raw)
            body["series_id"] = None if series is None else str(series)
            base = None if series is None else str(base_of.get(series, series))
            body["upstream"] = None if base is None else series_upstream(whole, known, base)
        return JsonResponse(body)

    async def readyz(request: Request) -> Response:
        checks: dict[str, bool] = {"store_open": not store.closed}
        try:
            checks.update((str(k), bool(v)) for k, v in readiness().items())
        except Exception:
            log.exception("readiness check raised")
            checks["readiness_check"] = False
        ready = all(checks.values())
        body: dict[str, Any] = {"ready": ready, "checks": checks, **about()}
        if not ready:
            failing = sorted(k for k, v in checks.items() if not v)
            body.update(error="not_ready", message="not ready: " + ", ".join(failing))
        return JsonResponse(body, status_code=200 if ready else 503)

    async def metrics_text(request: Request) -> Response:
        return Response(metrics.render(), headers=NOSNIFF_HEADERS, media_type=CONTENT_TYPE_LATEST)

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestRefused)
        metrics.http_refusals_total.labels(code=exc.code).inc()
        return JsonResponse(exc.to_wire(), status_code=exc.status, headers=exc.headers)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return JsonResponse(
            {"error": code, "message": f"{exc.detail}: {request.method} {request.url.path}"},
            status_code=exc.status_code,
            headers=exc.headers,
        )

    # the API's answers are compressed as they go; the chart page's files were compressed
    # once (chart_page), and its routes answer Accept-Encoding and Vary themselves
    gz = [Middleware(GZipMiddleware, minimum_size=GZIP_MIN_BYTES, compresslevel=GZIP_LEVEL)]
    routes: list[BaseRoute] = [
        Route("/api/market/candles", candles, methods=["GET"], middleware=gz),
        Route("/api/market/ingest/candle_closed", ingest_candle_closed, methods=["POST"]),
        Route("/api/market/series", series_list, methods=["GET"], middleware=gz),
        Route("/api/market/events", events, methods=["GET"], middleware=gz),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"], middleware=gz),
        Route("/metrics", metrics_text, methods=["GET"], middleware=gz),
        *chart_page_routes(),  # GET / (the chart page) and /assets/{path}: docs/chart.md
    ]
    if market is not None:
        routes.extend(market_websocket_routes(market))
    return Starlette(
        routes=routes,
        exception_handlers={RequestRefused: refused, HTTPException: http_error},
    )
