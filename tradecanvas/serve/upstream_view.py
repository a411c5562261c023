"""What ``GET /healthz`` says of Binance (docs/api.md): for the whole node, for the
connection that carries one series, and how many connections of each market are open.

Plain rules over what the node knows, passed in: ``whole`` — ``connected`` (every Binance
connection of the node, or of the ingest node holding the lease, is open), ``disconnected``
(at least one is not), ``no_ingest`` (an edge: no node holds the lease) or None (not known:
a standby, an edge before its first read) — and the connections behind it (the node's own,
or as the ingest report tells them: None from an older ingest, which reports only
``whole``).

A series' answer is its base series' connection's. Without the connections (an older
ingest) it is ``whole``, as before; a series the connections do not carry (the ingest
serves another set: a configuration being rolled out) is None, not known — never
``disconnected``, which would put "Binance unreachable" on a chart that may be receiving.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from tradecanvas.bus.feed import EdgeFeed
from tradecanvas.ingest.supervisor import ConnectionState, IngestSupervisor

# the answers that come from the node's connections (the others say why there are none)
KNOWN: Final = frozenset({"connected", "disconnected"})


def series_upstream(
    whole: str | None, connections: Sequence[ConnectionState] | None, base_series_id: str
) -> str | None:
    """``upstream`` for a series whose base series is ``base_series_id``."""
    if whole not in KNOWN or connections is None:
        return whole
    for connection in connections:
        if base_series_id in connection.series:
            return "connected" if connection.connected else "disconnected"
    return None


def connection_counts(
    whole: str | None, connections: Sequence[ConnectionState] | None
) -> dict[str, dict[str, int]] | None:
    """``{market: {"open": n, "total": m}}``, markets in name order, so an operator sees
    "1 of 3 futures connections down"; None when not known."""
    if whole not in KNOWN or connections is None:
        return None
    counts: dict[str, dict[str, int]] = {}
    for connection in sorted(connections, key=lambda c: c.market):
        market = counts.setdefault(connection.market, {"open": 0, "total": 0})
        market["total"] += 1
        market["open"] += int(connection.connected)
    return counts


def connections_of(
    supervisor: IngestSupervisor | None, feed: EdgeFeed | None
) -> Callable[[], Sequence[ConnectionState] | None]:
    """Where a node's /healthz learns its connections: its own supervisor (roles all and
    ingest; only read while ``upstream_connected`` is a readiness check, i.e. while it
    ingests), or the ingest report an edge's feed reads."""
    if supervisor is not None:
        return supervisor.connection_states
    if feed is not None:
        return feed.ingest_report.connections
    return lambda: None
