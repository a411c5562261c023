"""What the ingest node holding the lease tells the edges about its Binance connections, and
an edge's view of it.

An edge has no Binance connection of its own, so on its own it cannot tell a quiet market
from an ingest that lost Binance, or from no ingest at all. The lease holder writes, with
every renewal (a third of the lease's TTL; ``bus/leader.py``), the key ``<prefix>ingest_report``
= ``{"node": …, "upstream_connected": …, "connections": […]}``, expiring with the lease's TTL:
the key is there exactly while some node holds the lease and renews it. ``upstream_connected``
is true only while every Binance connection of the node is open; ``connections`` (an older
ingest writes none) says each connection's market, base series and state
(``[{"market": "spot", "series": ["binance:spot:BTC/USDT:1m"], "connected": true}, …]``),
so an edge's ``/healthz?series_id=`` answers for the connection that carries that series
rather than for all of them. An edge reading a report without it (an older ingest during
a rolling upgrade), or with one it cannot read, falls back to ``upstream_connected``; an
older edge ignores the field. An edge reads it every second
(:class:`IngestReportWatch`) and shows it in its ``/readyz`` body as ``ingest`` — not as a
check: an edge with its store and Redis serves history and reconnects whatever Binance
does, and a balancer must not take every edge out at once because Binance is away. The
chart's badge reads it ("Binance unreachable", "no ingest node running").

:func:`decode` is pure; a report that is not ours (another program's key, a newer format)
is a :class:`~tradecanvas.errors.WireError`, and the edge shows no report.
"""

from __future__ import annotations

import logging
from typing import Any, Final, final

import attrs
import coredis
import orjson
import trio

from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.redis_io import describe, reconnecting
from tradecanvas.errors import WireError
from tradecanvas.ingest.supervisor import ConnectionState
from tradecanvas.upstream.backoff import Backoff
from tradecanvas.wire.bus import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)

# how often an edge reads the report: well inside the lease's TTL (5 s by default)
POLL_S: Final = 1.0
COMMAND_TIMEOUT_S: Final = 5.0
_BACKOFF: Final = Backoff(base_s=0.5, cap_s=10.0)


@attrs.frozen
class IngestReport:
    node: str
    upstream_connected: bool
    # each Binance connection (None: not told, an older ingest's report)
    connections: tuple[ConnectionState, ...] | None = None

    def encode(self) -> bytes:
        doc: dict[str, Any] = self.to_json()
        if self.connections is not None:
            doc["connections"] = [
                {"market": c.market, "series": list(c.series), "connected": c.connected}
                for c in self.connections
            ]
        raw = orjson.dumps(doc)
        if len(raw) > MAX_PAYLOAD_BYTES:
            # thousands of series: an edge would refuse the whole report; without the
            # connections it still says whether every one is open
            raw = orjson.dumps(self.to_json())
        return raw

    def to_json(self) -> dict[str, Any]:
        """What an edge's /readyz shows of it (the connections are /healthz's)."""
        return {"node": self.node, "upstream_connected": self.upstream_connected}


def _connections(doc: object) -> tuple[ConnectionState, ...] | None:
    """The report's ``connections``, or None when it has none or none this edge can read (a
    newer format): the edge then answers as for an older ingest, by ``upstream_connected``."""
    if not isinstance(doc, list):
        return None
    found: list[ConnectionState] = []
    for item in doc:
        if not isinstance(item, dict):
            return None
        market, series, connected = item.get("market"), item.get("series"), item.get("connected")
        if not (
            isinstance(market, str)
            and isinstance(connected, bool)
            and isinstance(series, list)
            and all(isinstance(s, str) for s in series)
        ):
            return None
        found.append(ConnectionState(market, tuple(series), connected))
    return tuple(found)


def decode(raw: bytes) -> IngestReport:
    """The report in the key's value; WireError when it is not one (or over the bus's cap
    on a payload, unparsed). A ``connections`` it cannot read is left out, not an error."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise WireError("ingest_report", f"{len(raw)} bytes, over {MAX_PAYLOAD_BYTES}")
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError("ingest_report", f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise WireError("ingest_report", "not a JSON object")
    node, connected = doc.get("node"), doc.get("upstream_connected")
    if not isinstance(node, str) or not isinstance(connected, bool):
        raise WireError("ingest_report", "needs node (a string) and upstream_connected (a bool)")
    return IngestReport(node, connected, _connections(doc.get("connections")))


@final
class IngestReportWatch:
    """An edge's copy of the ingest's report, read every :data:`POLL_S` while Redis answers.

    :meth:`readyz_fields` is what ``/readyz`` adds to its body, always ``ingest``: the
    report, null when Redis answered that no node reports (none holds the lease), or — not
    read yet, or Redis does not answer (until the watch's next read after it is back: its
    backoff, a few seconds) — ``{"node": null, "upstream_connected": null, "unknown": why}``,
    so the body's shape does not depend on the moment it is asked (the feed's check,
    ``bus_feed_connected``, says whether Redis is there)."""

    def __init__(self, url: str, keys: StreamKeys, *, poll_s: float = POLL_S) -> None:
        self.url = url
        self.poll_s = poll_s
        self.key = keys.ingest_report
        self._report: IngestReport | None = None
        self._known = False
        self._unknown_why = "Redis not read yet"
        self._bad_logged = False
        self._read = trio.Event()
        self._failed = trio.Event()

    async def wait_read(self) -> None:
        """Until the next read of the key is taken."""
        await self._read.wait()

    async def wait_failed(self) -> None:
        """Until the next Redis failure of the watch."""
        await self._failed.wait()

    def connections(self) -> tuple[ConnectionState, ...] | None:
        """The reporting node's connections, for ``/healthz?series_id=``; None when no report
        is known or it has none (an older ingest: ``upstream_connected`` is all there is)."""
        if not self._known or self._report is None:
            return None
        return self._report.connections

    def readyz_fields(self) -> dict[str, Any]:
        if not self._known:
            why = self._unknown_why
            return {"ingest": {"node": None, "upstream_connected": None, "unknown": why}}
        return {"ingest": None if self._report is None else self._report.to_json()}

    def set_raw(self, raw: bytes | None) -> None:
        """Take the key's value as read (None: no key)."""
        self._known = True
        self._read.set()
        self._read = trio.Event()
        if raw is None:
            self._report = None
            return
        try:
            self._report = decode(raw)
            self._bad_logged = False
        except WireError as exc:
            self._report = None
            if not self._bad_logged:  # once while it stays bad
                log.warning("ingest report: %s holds no report (%s); showing none", self.key, exc)
                self._bad_logged = True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Read the report until cancelled; Redis failures are retried (the feed logs them)."""

        async def poll(client: coredis.Redis[bytes]) -> None:
            while True:
                with trio.fail_after(COMMAND_TIMEOUT_S):
                    raw = await client.get(self.key)
                self.set_raw(raw)
                await trio.sleep(self.poll_s)

        def failed(failure: BaseException) -> None:
            self._known = False
            self._unknown_why = f"Redis does not answer ({describe(failure)})"
            self._failed.set()
            self._failed = trio.Event()
            log.debug("ingest report: Redis failed (%s), retrying", describe(failure))

        task_status.started()
        await reconnecting(
            self.url,
            poll,
            command_timeout_s=COMMAND_TIMEOUT_S,
            backoff=_BACKOFF,
            on_connected=lambda _reconnect: None,
            on_failure=failed,
        )
