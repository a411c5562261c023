"""The /ws/market protocol without I/O (DESIGN §3, §6): close codes, client messages, inbound
limits and the handshake (path, Origin, shutdown).

Plain functions and classes, tested without sockets; ``tradecanvas.serve.ws_session`` is the
trio shell that wires them to a connection, whichever transport carries it (the WS port's
``ws_server``, the HTTP port's ``ws_asgi``), and ``tradecanvas.serve.subscriber_queue`` takes
its slow-consumer close code from here. Time is passed in (``now``) wherever a rule needs it.

Errors: :func:`parse_client_message` raises :class:`~tradecanvas.errors.ClientMessageError`
(code ``bad_request``) saying what is wrong. Nothing else here raises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Final, Literal, final
from urllib.parse import urlsplit

import attrs

from tradecanvas.errors import ClientMessageError, SeriesIdError
from tradecanvas.model import SeriesId
from tradecanvas.wire.json import loads

WS_PATH: Final = "/ws/market"
# a client sends a handful of small control messages; a chart's dozen subscribes fit easily
MAX_MESSAGE_BYTES: Final = 64 * 1024
# since beyond this is not a time in seconds (year 5138): most likely milliseconds
MAX_SINCE: Final = 10**11
# event ids are SQLite/PostgreSQL 64-bit integers
MAX_EVENT_ID: Final = 2**63 - 1


def since_problem(since: int) -> str | None:
    """What keeps an integer ``since`` from being a cursor in seconds (the socket's and the
    HTTP API's words, after "since"), None when nothing does."""
    if since < 0:
        return f"must not be negative, got {since}"
    if since > MAX_SINCE:
        return f"{since} is too large: candle_time is in seconds, not milliseconds"
    return None


CLIENT_TYPES: Final = ("subscribe", "unsubscribe", "ping")

# why an upgrade is refused (tradecanvas_ws_refusals_total{reason})
REFUSAL_REASONS: Final = ("not_found", "origin", "shutdown", "max_connections")

CLOSE_NORMAL: Final = 1000
CLOSE_GOING_AWAY: Final = 1001
# "no status code was present" (RFC 6455 §7.4.1): the peer closed, its code is not known
CLOSE_NO_STATUS: Final = 1005
# the connection ended without a close handshake (never sent on the wire)
CLOSE_ABNORMAL: Final = 1006
CLOSE_POLICY: Final = 1008
CLOSE_TOO_BIG: Final = 1009
CLOSE_INTERNAL_ERROR: Final = 1011
CLOSE_SLOW_CONSUMER: Final = 4008
# close codes with which a client ends its connection normally (RFC 6455 §7.4.1)
CLIENT_GOODBYE_CODES: Final = (CLOSE_NORMAL, CLOSE_GOING_AWAY)


# --- client messages -------------------------------------------------------------------


@attrs.frozen
class SubscribeRequest:
    series: SeriesId
    since: int | None
    supports_batch: bool
    # the event-log cursor: stored events of the series after it come first; None: live only
    events_after: int | None = None


@attrs.frozen
class UnsubscribeRequest:
    series: SeriesId


@attrs.frozen
class PingRequest:
    pass


ClientRequest = SubscribeRequest | UnsubscribeRequest | PingRequest


def _json_kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value!r}"
    if isinstance(value, str):
        return f"string {value!r:.60}"
    if isinstance(value, list):
        return "array"
    return "object"


def _bad(message: str, series_id: str | None = None) -> ClientMessageError:
    return ClientMessageError("bad_request", message, series_id)


def parse_client_message(raw: str | bytes) -> ClientRequest:
    """Parse one client frame (DESIGN §3). Raises ClientMessageError saying what is wrong."""
    try:
        doc = loads(raw)
    except ValueError as exc:
        raise _bad(f"message is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise _bad(f'message must be a JSON object with a "type", got a JSON {_json_kind(doc)}')
    if "type" not in doc:
        raise _bad('message has no "type"; expected one of: ' + ", ".join(CLIENT_TYPES))
    kind = doc["type"]
    if not isinstance(kind, str) or kind not in CLIENT_TYPES:
        raise _bad(f"unknown type {_json_kind(kind)}; expected one of: " + ", ".join(CLIENT_TYPES))
    if kind == "ping":
        return PingRequest()
    raw_sid = doc.get("series_id")
    sid_text = raw_sid if isinstance(raw_sid, str) else None
    if raw_sid is None:
        raise _bad(f"{kind} needs a series_id, such as binance:futures:BTC/USDT:1m")
    try:
        series = SeriesId.parse(raw_sid)
    except SeriesIdError as exc:
        raise _bad(str(exc), sid_text) from None
    if kind == "unsubscribe":
        return UnsubscribeRequest(series)
    since = doc.get("since")
    if since is not None:
        if isinstance(since, bool) or not isinstance(since, int):
            raise _bad(
                "since must be null or an integer number of seconds (a candle_time),"
                f" got a {_json_kind(since)}",
                sid_text,
            )
        problem = since_problem(since)
        if problem is not None:
            raise _bad(f"since {problem}", sid_text)
    batch = doc.get("supports_batch", False)
    if batch is None:
        batch = False
    if not isinstance(batch, bool):
        raise _bad(f"supports_batch must be true or false, got a {_json_kind(batch)}", sid_text)
    events_after = doc.get("events_after")
    if events_after is not None and (
        isinstance(events_after, bool)
        or not isinstance(events_after, int)
        or not 0 <= events_after <= MAX_EVENT_ID
    ):
        raise _bad(
            "events_after must be null or a non-negative integer (the last event_id you"
            f" received, 0 for every stored event), got a {_json_kind(events_after)}",
            sid_text,
        )
    return SubscribeRequest(series, since, batch, events_after)


# --- inbound limits --------------------------------------------------------------------


@attrs.frozen
class InboundLimits:
    """Per-connection limits on what a client sends (DESIGN §6): a token bucket of
    ``messages_per_s`` with bursts of ``burst``; a client whose messages keep being refused
    for ``abuse_after_s`` (no pause of ``quiet_s`` without a refusal) is closed with 1008."""

    messages_per_s: float = 20.0
    burst: int = 40
    abuse_after_s: float = 5.0
    quiet_s: float = 1.0

    def rate_limited_error(self) -> ClientMessageError:
        """The ``rate_limited`` answer to a refused message."""
        return ClientMessageError(
            "rate_limited",
            f"too many messages: at most {self.messages_per_s:g}/s"
            f" (bursts of {self.burst}); this one was ignored",
        )


@final
class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up. Sans-IO: pass the time in."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


RateVerdict = Literal["ok", "limited", "ignored", "abuse"]


@final
class RateLimiter:
    """The token bucket plus the abuse rule. A flood still gets ``messages_per_s`` through,
    so the abuse streak is measured from the first refusal and only ends after ``quiet_s``
    without one."""

    def __init__(self, limits: InboundLimits, now: float) -> None:
        self.limits = limits
        self.bucket = TokenBucket(limits.messages_per_s, limits.burst, now)
        self.limited_since: float | None = None
        self.last_refusal = -math.inf
        self.last_answer = -math.inf

    def check(self, now: float) -> RateVerdict:
        """``"ok"``, ``"limited"`` (answer rate_limited), ``"ignored"`` (refused without an
        answer) or ``"abuse"`` (close 1008).

        At most one ``rate_limited`` answer per ``quiet_s``: answering every refused message
        would let a flooding client that does not read fill its own queue, and be cut off
        as a slow consumer (4008) instead of for abuse (1008).
        """
        if now - self.last_refusal > self.limits.quiet_s:
            self.limited_since = None
        if self.bucket.take(now):
            return "ok"
        if self.limited_since is None:
            self.limited_since = now
        self.last_refusal = now
        if now - self.limited_since >= self.limits.abuse_after_s:
            return "abuse"
        if now - self.last_answer >= self.limits.quiet_s:
            self.last_answer = now
            return "limited"
        return "ignored"


# --- the handshake ---------------------------------------------------------------------


@attrs.frozen
class HandshakeRefusal:
    """An upgrade answered with an HTTP error instead: ``status``, a plain-text ``body``,
    ``why`` for the log and ``reason`` for ``tradecanvas_ws_refusals_total`` (one of
    :data:`REFUSAL_REASONS`)."""

    status: int
    body: bytes
    why: str
    reason: str


def refuse_handshake(
    target: str,
    origin: str | None,
    allowed: Sequence[str],
    *,
    closing: bool,
    connections: int = 0,
    max_connections: int | None = None,
) -> HandshakeRefusal | None:
    """Why an upgrade request for ``target`` (a path, maybe with a query string) with this
    ``Origin`` header is refused, or None to accept it: 404 for another path than
    :data:`WS_PATH`, 403 for an Origin not in ``allowed``, 503 while shutting down or when
    ``connections`` are open already and that is ``max_connections``."""
    path = request_path(target)
    if path != WS_PATH:
        return HandshakeRefusal(
            404,
            f"not found: only {WS_PATH} is served\n".encode(),
            f"404 for path {path[:200]!r}",
            "not_found",
        )
    if not origin_allowed(origin, allowed):
        return HandshakeRefusal(
            403, b"origin not allowed\n", f"403 for Origin {origin!r:.200}", "origin"
        )
    if closing:
        return HandshakeRefusal(503, b"shutting down\n", "503 while shutting down", "shutdown")
    if max_connections is not None and connections >= max_connections:
        return HandshakeRefusal(
            503,
            f"too many connections: at most {max_connections}; try again later\n".encode(),
            f"503: {connections} connections open, the limit",
            "max_connections",
        )
    return None


def origin_allowed(origin: str | None, allowed: Sequence[str]) -> bool:
    """No Origin (not a browser) is allowed; ``*`` allows all; ``scheme://host`` allows any
    port of that host; ``scheme://host:port`` exactly that port."""
    if origin is None or "*" in allowed:
        return True
    try:
        got = urlsplit(origin.strip())
        got_port = got.port
    except ValueError:
        return False
    if not got.scheme or not got.hostname:
        return False
    for entry in allowed:
        try:
            want = urlsplit(entry)
            want_port = want.port
        except ValueError:
            continue
        if want.scheme.lower() != got.scheme.lower() or want.hostname != got.hostname:
            continue
        if want_port is None or want_port == got_port:
            return True
    return False


def header(headers: Sequence[tuple[bytes, bytes]], name: bytes) -> str | None:
    """The first value of header ``name`` (lower-case bytes), as latin-1 text, or None."""
    for key, value in headers:
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def request_path(target: str) -> str:
    """The path of a request target, without its query string."""
    return target.split("?", 1)[0]


__all__ = [
    "CLIENT_GOODBYE_CODES",
    "CLIENT_TYPES",
    "CLOSE_ABNORMAL",
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_NORMAL",
    "CLOSE_NO_STATUS",
    "CLOSE_POLICY",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_TOO_BIG",
    "MAX_MESSAGE_BYTES",
    "MAX_SINCE",
    "REFUSAL_REASONS",
    "WS_PATH",
    "ClientRequest",
    "HandshakeRefusal",
    "InboundLimits",
    "PingRequest",
    "RateLimiter",
    "RateVerdict",
    "SubscribeRequest",
    "TokenBucket",
    "UnsubscribeRequest",
    "header",
    "origin_allowed",
    "parse_client_message",
    "refuse_handshake",
    "request_path",
    "since_problem",
]
