"""The Binance WebSocket connection plan (pure): which streams share a connection, its URL,
the reconnect timing and pacing, how a connection's end is named and backed off, and the
futures route check.

Nothing here imports trio or does I/O; :mod:`tradecanvas.upstream.binance_ws` is the trio
shell that follows this plan.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Final, Literal, final
from urllib.parse import urlsplit

import attrs

from tradecanvas.errors import FlagError, WireError
from tradecanvas.model import Market, SeriesId
from tradecanvas.runtime_flags import RuntimeFlags
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.wire.binance import ControlFrame, decode_frame

MAX_STREAMS_PER_CONNECTION: Final = 200  # BINANCE.md: futures docs disagree, 200 is safe

# how a connection ended on its own: Binance (or the network) closed it, it went silent
# for stale_timeout, or it ended with an exception
ConnectionEnd = Literal["drop", "stale", "error"]
# the ``reason`` label of tradecanvas_upstream_reconnects_total: a planned ``rotation`` (before
# Binance's 24 h cut) is not an incident; ``error`` also counts a connect that failed
RECONNECT_REASONS: Final = ("rotation", "drop", "stale", "server_shutdown", "error")


@attrs.frozen
class ConnectionPolicy:
    """Wall-clock timing of one Binance connection slot (never exchange time).

    Not flags: they follow Binance's connection rules. ``IngestPolicy.connection`` builds
    one; tests pass smaller values.
    """

    reconnect_base_s: float = 1.0
    reconnect_cap_s: float = 60.0
    healthy_after_s: float = 60.0  # a connection that lived this long resets the backoff
    min_connect_interval_s: float = 1.0  # BINANCE.md: pace connects >= 1 s apart
    connect_timeout_s: float = 10.0
    disconnect_timeout_s: float = 2.0
    rotate_after_s: float = 23.5 * 3600  # before Binance's 24 h cut
    overlap_max_s: float = 10.0  # make-before-break: wait this long for the new first frame

    @property
    def reconnect_backoff(self) -> Backoff:
        return Backoff(self.reconnect_base_s, self.reconnect_cap_s)


@final
class ConnectPacer:
    """When each connection attempt to one Binance host may start: never earlier than
    asked, and at least the interval after the attempt before it, whichever connection slot
    made it. Binance counts connection attempts per IP (300 per 5 min; BINANCE.md: pace
    connects >= 1 s apart), so the slots of one process share one pacer per host
    (:func:`tradecanvas.upstream.binance_ws.connect_pacer`).

    A turn, once given, is spent even if its holder is cancelled before it starts: waiting
    longer is safe, connecting sooner is not.
    """

    def __init__(self) -> None:
        self._last_start = -math.inf

    def reserve(self, now: float, interval_s: float) -> float:
        """The earliest time at or after ``now`` that is ``interval_s`` after the last turn
        given; it becomes the last turn."""
        start = max(now, self._last_start + interval_s)
        self._last_start = start
        return start


def build_combined_stream_url(base_url: str, streams: Sequence[str]) -> str:
    """``{base}/stream?streams=a/b``. ``http(s)://`` bases become ``ws(s)://``; the
    futures base keeps its ``/market`` route (without it Binance sends no klines)."""
    if not streams:
        raise ValueError("no streams to subscribe to")
    if len(streams) > MAX_STREAMS_PER_CONNECTION:
        raise ValueError(
            f"{len(streams)} streams on one connection; at most {MAX_STREAMS_PER_CONNECTION}"
        )
    base = base_url.strip().rstrip("/")
    if base.startswith("https://"):
        base = "wss://" + base.removeprefix("https://")
    elif base.startswith("http://"):
        base = "ws://" + base.removeprefix("http://")
    if not base.startswith(("ws://", "wss://")):
        raise ValueError(f"{base_url!r} is not a ws://, wss://, http:// or https:// URL")
    return f"{base}/stream?streams={'/'.join(streams)}"


def lacks_futures_route(url: str) -> bool:
    """Whether a WS URL (a base, or a stream URL built on one) lacks Binance's ``/market``
    route: no path segment ``market``. Since 2026-04-23 Binance sends an unrouted USDⓈ-M
    futures connection no kline frames at all (it still accepts it)."""
    return "market" not in urlsplit(url).path.split("/")


def _binance_host(url: str) -> str | None:
    """The host of ``url`` when it is one of Binance's own (``*.binance.com``), else None."""
    host = (urlsplit(url).hostname or "").lower()
    return host if host == "binance.com" or host.endswith(".binance.com") else None


def futures_ws_route_warning(flags: RuntimeFlags) -> str | None:
    """At start-up: refuse (FlagError, exit 2) a futures WS base on Binance's own host
    without the ``/market`` route — it would connect and never get a kline — and return a
    warning when another host (a test fake, a proxy, ``tradecanvas replay``) is used without
    it by a process that connects to futures: it may serve another path legitimately."""
    url = flags.binance_futures_ws_url
    if not lacks_futures_route(url):
        return None
    variable = "TRADE_CANVAS_BINANCE_FUTURES_WS_URL"
    host = _binance_host(url)
    if host is not None:
        raise FlagError(
            variable,
            f"{url!r} lacks the /market route: {host} sends an unrouted futures connection"
            f" no kline frames (since 2026-04-23); allowed: wss://{host}/market",
        )
    if flags.role == "edge" or all(sid.market != "futures" for sid in flags.series):
        return None  # no futures connection from this process
    return (
        f"{variable}={url} has no /market route: Binance itself would send such a futures"
        " connection no kline frames; fine only for a stand-in that serves another path"
    )


# a slot whose connections never delivered a frame says why after this many stale ends
# in a row, and again every SILENT_WARN_EVERY more (with the backoff, about every 15 min)
SILENT_WARN_AFTER: Final = 3
SILENT_WARN_EVERY: Final = 20


def silent_slot_warning(url: str, stale_ends: int) -> str | None:
    """What to log after the ``stale_ends``-th stale end of a connection slot that never
    received a frame on any of its connections (None: nothing this time), naming the
    likely cause: a futures URL without the ``/market`` route."""
    if stale_ends < SILENT_WARN_AFTER or (stale_ends - SILENT_WARN_AFTER) % SILENT_WARN_EVERY:
        return None
    text = f"no frame has ever arrived ({stale_ends} connections went stale)"
    host = _binance_host(url)
    if not lacks_futures_route(url) or (host is not None and not host.startswith("fstream")):
        return text + "; is the stream name or the upstream right?"
    route = "the USDⓈ-M futures" if host is not None else "if this is a USDⓈ-M futures URL, the"
    return (
        f"{text}: likely cause: {route} URL lacks the /market route, and since 2026-04-23"
        " Binance sends an unrouted futures connection no kline frames at all"
        " (TRADE_CANVAS_BINANCE_FUTURES_WS_URL; the default is wss://fstream.binance.com/market)"
    )


def ws_base_url(flags: RuntimeFlags, market: Market) -> str:
    """The configured WebSocket base URL of ``market``."""
    return flags.binance_futures_ws_url if market == "futures" else flags.binance_spot_ws_url


def connection_groups(series: Iterable[SeriesId]) -> list[tuple[SeriesId, ...]]:
    """The configured series split into connections: per market, at most 200 streams each,
    in configured order."""
    by_market: dict[Market, list[SeriesId]] = {}
    for sid in series:
        by_market.setdefault(sid.market, []).append(sid)
    groups: list[tuple[SeriesId, ...]] = []
    for items in by_market.values():
        for i in range(0, len(items), MAX_STREAMS_PER_CONNECTION):
            groups.append(tuple(items[i : i + MAX_STREAMS_PER_CONNECTION]))
    return groups


def announces_server_shutdown(message: str | bytes) -> bool:
    """Whether a raw frame is Binance's ``serverShutdown`` event.

    The reader runs this on every frame, so a substring search comes first and only a
    frame that mentions it is decoded; a malformed one is not (the processor counts it).
    """
    mentioned = (
        "serverShutdown" in message if isinstance(message, str) else b"serverShutdown" in message
    )
    if not mentioned:
        return False
    try:
        decoded = decode_frame(message)
    except WireError:
        return False
    return isinstance(decoded, ControlFrame) and decoded.kind == "server_shutdown"


def reconnect_reason(end: ConnectionEnd | None, *, shutdown_announced: bool = False) -> str:
    """The ``reason`` label (:data:`RECONNECT_REASONS`) of a connection replaced after it
    ended as ``end``, or (None) rotated while still open."""
    if shutdown_announced:
        return "server_shutdown"  # whether Binance closed before we rotated or not
    return "rotation" if end is None else end


def failures_after_end(
    failures: int,
    *,
    lived_s: float,
    healthy_after_s: float,
    shutdown_announced: bool,
    still_open: bool = False,
) -> int:
    """The reconnect backoff step after a connection ended or is being replaced (0:
    reconnect at once). ``still_open``: it is rotated while open (make-before-break: before
    Binance's 24 h cut, or once Binance announced serverShutdown).

    Only a healthy connection — one that lived ``healthy_after_s`` (a minute: Binance's
    quiet markets go up to 35 s without a frame, so a shorter life proves little) — restarts
    the backoff: at once when its end was planned (rotated while open) or announced
    (serverShutdown), else after one small jittered step. A short-lived one backs off
    further whatever ended it, announced or rotated included, so an endpoint that announces
    a shutdown right after every connect cannot drive us into its connection-rate limit
    (300 attempts per 5 min per IP): its waits double up to the cap (a minute).
    """
    if lived_s >= healthy_after_s:
        return 0 if shutdown_announced or still_open else 1
    return failures + 1
