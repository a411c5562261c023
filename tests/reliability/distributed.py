"""The reliability suite's distributed topology: ``tradecanvas serve --role ingest`` and
``--role edge`` as real subprocesses (:class:`tests.cli_rig.Children`, so each can be
killed and started again) on real PostgreSQL and Redis, fed by ``tradecanvas replay``; and
read-only looks into the PostgreSQL store.

Each test brings its own database (``pg_url``, dropped afterwards) and Redis key prefix
(``keys``, deleted afterwards) or a private ``redis-server``; the shared services are never
restarted or flushed.
"""

from __future__ import annotations

import contextlib
import signal
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import psycopg

from tests.bus.cluster import Node
from tests.cli_rig import Children, exit_code_within, wait_for_line
from tests.reliability.rig import WAIT_S, Subscriber, serve_env
from tradecanvas.model import Candle

# an ingest role serves no /ws/market: its ws= is "-"
ROLE_READY: Final = r"tradecanvas ready ws=(\S+) http=(http://\S+)"
# the shortest lease: a restarted ingest node takes over within half a second
LEASE_MS: Final = "500"


def role_env(
    tmp: Path,
    ws: str,
    rest: str,
    series: list[str],
    *,
    database_url: str,
    redis_url: str,
    prefix: str,
    **extra: str,
) -> dict[str, str]:
    """:func:`~tests.reliability.rig.serve_env` for the roles: the store is the PostgreSQL
    database (``TRADE_CANVAS_DATABASE_URL`` wins over the SQLite path), the bus Redis."""
    return serve_env(
        tmp / "unused.sqlite3",
        ws,
        rest,
        series,
        TRADE_CANVAS_DATABASE_URL=database_url,
        TRADE_CANVAS_REDIS_URL=redis_url,
        TRADE_CANVAS_BUS_PREFIX=prefix,
        TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH="1",
        **extra,
    )


async def start_role(kids: Children, tmp: Path, role: str, env: dict[str, str]) -> Node:
    """``tradecanvas serve --role ROLE`` (its log ``ROLE.log``, appended across restarts)
    once it logged that it is ready."""
    log = tmp / f"{role}.log"
    after = log.stat().st_size if log.exists() else 0
    proc = kids.start(["serve", "--role", role], log, env)
    match = await wait_for_line(log, ROLE_READY, proc, after=after, within=WAIT_S)
    return Node(role, proc, log, match.group(1), match.group(2))


async def stop_nodes(*nodes: Node) -> None:
    """SIGTERM each node in turn; each exits 0 (else its log's end is the message)."""
    for node in nodes:
        node.proc.send_signal(signal.SIGTERM)
        assert await exit_code_within(node.proc, WAIT_S) == 0, node.log.read_text()[-3000:]


# --- the PostgreSQL store, read-only ----------------------------------------------------


def _query(url: str, sql: str, series: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(psycopg.connect(url)) as conn:
        return conn.execute(sql, (series,)).fetchall()


def pg_differences(url: str, series: str, source: list[Candle]) -> tuple[int, int, int]:
    """(stored, missing, different) of ``series`` against ``source`` (NUMERIC values)."""
    rows = _query(
        url,
        "SELECT candle_time, open, high, low, close, volume FROM candles"
        " WHERE series_id = %s ORDER BY candle_time",
        series,
    )
    by_time = {r[0]: tuple(Decimal(v) for v in r[1:]) for r in rows}
    missing = different = 0
    for c in source:
        got = by_time.get(c.candle_time)
        if got is None:
            missing += 1
        elif got != (c.open, c.high, c.low, c.close, c.volume):
            different += 1
    return len(rows), missing, different


def pg_event_ids(url: str, series: str) -> list[int]:
    rows = _query(url, "SELECT event_id FROM events WHERE series_id = %s ORDER BY event_id", series)
    return [int(r[0]) for r in rows]


def check_pg_stored(url: str, sub: Subscriber, source: dict[str, list[Candle]]) -> int:
    """Every series of ``source`` is stored whole and equal to it, and ``sub`` got every
    stored event once, across its sessions, in order; asserts it and returns the candles
    stored."""
    stored = 0
    for sid, candles in sorted(source.items()):
        n, missing, different = pg_differences(url, sid, candles)
        stored += n
        assert (n, missing, different) == (len(candles), 0, 0), sid
        assert sub.events[sid] == pg_event_ids(url, sid), sid
    return stored
