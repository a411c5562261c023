"""The reliability suite's rig: seeded kline CSVs, the real ``tradecanvas replay`` and
``tradecanvas serve`` in subprocesses, a recording ``/ws/market`` subscriber that resumes
with ``since``/``events_after``, and read-only looks into the SQLite file.

Children run through ``tests/cli_rig.py``: they write to files, never to pipes, each in its
own process group, killed on the way out whatever happens.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import subprocess
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import orjson
import trio
import trio_websocket

from tests.cli_rig import Children, cli_env, wait_for_line
from tradecanvas.errors import find_in_group
from tradecanvas.model import Candle
from tradecanvas.upstream.ws_client import open_websocket_client

SYMBOLS: Final = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "BNBUSDT")
START: Final = 1_751_760_000  # 2025-07-06 00:00 UTC, on every grid
WAIT_S: Final = 120.0  # an upper bound on any wait; a hang fails instead of blocking
READY: Final = r"tradecanvas ready ws=(ws://\S+) http=(http://\S+)"
OBJ = dict[str, Any]


def series_of(symbol: str) -> str:
    return f"binance:futures:{symbol[:-4]}/USDT:1m"


def generate_candles(seed: int, count: int, start: int = START) -> list[Candle]:
    """``count`` closed 1m candles from ``start``: a seeded random walk, two decimals."""
    rng = random.Random(seed)
    price = Decimal(rng.randint(1000, 90000))
    out: list[Candle] = []
    for i in range(count):
        open_ = price
        close = max(Decimal("1.00"), open_ + Decimal(rng.randint(-500, 500)) / 100)
        high = max(open_, close) + Decimal(rng.randint(0, 300)) / 100
        low = max(Decimal("0.50"), min(open_, close) - Decimal(rng.randint(0, 300)) / 100)
        volume = Decimal(rng.randint(0, 10**6)) / 1000
        out.append(Candle(start + 60 * i, open_, high, low, close, volume))
        price = close
    return out


def write_csv(path: Path, candles: list[Candle]) -> Path:
    lines = ["open_time,open,high,low,close,volume"]
    lines += [
        f"{c.candle_time * 1000},{c.open},{c.high},{c.low},{c.close},{c.volume}" for c in candles
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def csv_files(tmp: Path) -> list[Path]:
    """The files :func:`market_files` writes."""
    return [tmp / f"{symbol}-1m-reliability.csv" for symbol in SYMBOLS]


def market_files(tmp: Path, seed: int, count: int) -> dict[str, list[Candle]]:
    """One CSV per symbol in ``tmp`` (``BTCUSDT-1m-….csv``); series → its candles."""
    out: dict[str, list[Candle]] = {}
    for i, (symbol, path) in enumerate(zip(SYMBOLS, csv_files(tmp), strict=True)):
        candles = generate_candles(seed * 10 + i, count)
        write_csv(path, candles)
        out[series_of(symbol)] = candles
    return out


async def start_replay(
    kids: Children, tmp: Path, files: list[Path], *extra: str
) -> tuple[subprocess.Popen[bytes], str, str]:
    log = tmp / "replay.log"
    args = ["replay", *map(str, files), "--speed", "max", "--forming-per-bar", "1", *extra]
    proc = kids.start(args, log, dict(os.environ))
    match = await wait_for_line(log, r"replay ws=(\S+) rest=(\S+)", proc, within=WAIT_S)
    return proc, match.group(1), match.group(2)


def serve_env(db: Path, ws: str, rest: str, series: list[str], **extra: str) -> dict[str, str]:
    return cli_env(
        TRADE_CANVAS_DB_PATH=str(db),
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL=ws,
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL=rest,
        TRADE_CANVAS_SERIES=",".join(series),
        TRADE_CANVAS_INITIAL_BACKFILL_CANDLES="5000",
        TRADE_CANVAS_BINANCE_WS_FLUSH_S="0.05",
        **extra,
    )


async def start_serve(
    kids: Children,
    log: Path,
    env: dict[str, str],
    preexec_fn: Callable[[], None] | None = None,
    prefix: list[str] | None = None,
) -> tuple[subprocess.Popen[bytes], str, str]:
    """``tradecanvas serve``; returns it with its ws:// and http:// URLs once ready."""
    after = (await trio.Path(log).stat()).st_size if await trio.Path(log).exists() else 0
    proc = kids.start(["serve"], log, env, preexec_fn, prefix)
    match = await wait_for_line(log, READY, proc, after=after, within=WAIT_S)
    return proc, match.group(1), match.group(2)


# catch-up batches of a few thousand candles on every series are bigger than the package's
# 1 MiB default
MAX_MESSAGE_BYTES: Final = 1 << 26


def connect(url: str) -> contextlib.AbstractAsyncContextManager[trio_websocket.WebSocketConnection]:
    """A client connection through the package's own client
    (:func:`~tradecanvas.upstream.ws_client.open_websocket_client`): its TCP stream is
    closed on the way out however the connection ends, a close racing the daemon's read-proof
    ping ends cleanly (python-trio/trio-websocket#184), a cancelled client just drops its
    socket, and a failed handshake raises ``HandshakeError``."""
    return open_websocket_client(url, max_message_size=MAX_MESSAGE_BYTES)


class Subscriber:
    """A real /ws/market client over many sessions: each session subscribes every series
    with ``since`` = the newest closed candle it has and ``events_after`` = the newest
    event_id it has, so it resumes exactly where it stopped."""

    def __init__(self, series: list[str], first: int) -> None:
        self.series = series
        self.times: dict[str, list[int]] = {s: [] for s in series}
        self.candles: dict[str, dict[int, OBJ]] = {s: {} for s in series}
        self.events: dict[str, list[int]] = {s: [] for s in series}
        self.first = first
        self.gaps: list[OBJ] = []
        self.errors: list[OBJ] = []
        self.sessions: list[dict[str, list[int]]] = []  # per session: the times it got
        self.close_code: int | None = None
        self.changed = trio.Event()

    def since(self, series: str) -> int:
        return self.times[series][-1] if self.times[series] else self.first - 60

    def total(self) -> int:
        return sum(len(t) for t in self.times.values())

    def _take(self, m: OBJ) -> None:
        kind, sid = m.get("type"), m.get("series_id", "")
        if kind == "candles_batch" and sid in self.times:
            for c in m["candles"]:
                self.times[sid].append(c["candle_time"])
                self.candles[sid][c["candle_time"]] = c
                self.sessions[-1][sid].append(c["candle_time"])
        elif kind == "system" and sid in self.events and "event_id" in m:
            self.events[sid].append(m["event_id"])
        elif kind == "gap":
            self.gaps.append(m)
        elif kind == "error":
            self.errors.append(m)

    async def session(self, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        """One connection until the server closes it (or the test cancels it)."""
        self.sessions.append({s: [] for s in self.series})
        self.close_code = None
        try:
            async with connect(url) as ws:
                for sid in self.series:
                    after = self.events[sid][-1] if self.events[sid] else 0
                    sub = {"type": "subscribe", "series_id": sid, "since": self.since(sid)}
                    sub |= {"supports_batch": True, "events_after": after}
                    await ws.send_message(orjson.dumps(sub).decode())
                task_status.started()
                while True:
                    self._take(orjson.loads(await ws.get_message()))
                    self.changed.set()
                    self.changed = trio.Event()
        except* trio_websocket.ConnectionClosed as group:
            reason = find_in_group(group, trio_websocket.ConnectionClosed)
            self.close_code = reason.reason.code if reason and reason.reason else None
        except* (trio_websocket.HandshakeError, OSError):
            self.close_code = -1
        self.changed.set()

    async def wait_until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT_S):
            while not condition():
                await self.changed.wait()


def duplicates(times: list[int]) -> int:
    return len(times) - len(set(times))


def same_candle(wire: OBJ, ref: Candle) -> bool:
    fields = ("open", "high", "low", "close", "volume")
    return wire["candle_time"] == ref.candle_time and all(
        wire[f] == float(getattr(ref, f)) for f in fields
    )


# --- the SQLite file, read-only ---------------------------------------------------------


def db_connect(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True)


def stored_rows(db: Path, series: str) -> list[tuple[Any, ...]]:
    with contextlib.closing(db_connect(db)) as conn:
        return conn.execute(
            "SELECT candle_time, open, high, low, close, volume FROM candles"
            " WHERE series_id = ? ORDER BY candle_time",
            (series,),
        ).fetchall()


def stored_differences(db: Path, series: str, source: list[Candle]) -> tuple[int, int, int]:
    """(stored, missing, different) of ``series`` against ``source`` (exact decimal text)."""
    rows = {r[0]: r for r in stored_rows(db, series)}
    missing = different = 0
    for c in source:
        row = rows.get(c.candle_time)
        if row is None:
            missing += 1
        elif tuple(Decimal(v) for v in row[1:]) != (c.open, c.high, c.low, c.close, c.volume):
            different += 1
    return len(rows), missing, different


def integrity(db: Path) -> str:
    with contextlib.closing(db_connect(db)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def stored_event_ids(db: Path, series: str) -> list[int]:
    with contextlib.closing(db_connect(db)) as conn:
        rows = conn.execute(
            "SELECT event_id FROM events WHERE series_id = ? ORDER BY event_id", (series,)
        )
        return [r[0] for r in rows]


def check_resumed(sub: Subscriber, source: dict[str, list[Candle]]) -> tuple[int, int]:
    """Across its sessions ``sub`` got every candle of ``source`` once, in order, equal to
    the source, no gap, and each session went on exactly from its cursor (``since``), none
    skipped or repeated; asserts it and returns (lost, duplicated) for the record."""
    lost = dup = 0
    for sid, candles in source.items():
        times = sub.times[sid]
        dup += duplicates(times)
        expected = [c.candle_time for c in candles]
        lost += len(set(expected) - set(times))
        assert times == expected, f"{sid}: received out of order, doubled or with a hole"
        assert all(same_candle(sub.candles[sid][c.candle_time], c) for c in candles), sid
        had: list[int] = []
        for k, session in enumerate(sub.sessions):
            if session[sid]:
                want = had[-1] + 60 if had else expected[0]
                assert session[sid][0] == want, (k, sid)
            had += session[sid]
    assert not sub.gaps, sub.gaps
    return lost, dup
