"""What a real charting client sees: a reference client with the merge rule of the TradeCanvas
frontend (and of most charting clients) — keep the newest bar, ignore any candle older than it,
reload a range on ``factor.rebuild`` — follows the real ``tradecanvas serve`` fed by the real
``tradecanvas replay``, and its final bars must equal the store's, for 1m and the derived 5m,
with both publish paths (DESIGN §10, the ordering rule).

Scenarios: a client that joins during the start-up backfill (the first REST call is answered
429, so the backfill is still running when it subscribes) and one subscribed before the market
starts; omitted closes repaired over REST; an exchange hole; duplicated closes. At maximum
speed, and with a forming frame every 250 ms of wall time — Binance's own pace, the pace at
which a 0.5 s flush timer lets the next bar's forming overtake a close.
"""

from __future__ import annotations

import csv
import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import pytest
import trio

from tests.cli_rig import cli_env, run_cli, wait_for_line
from tests.conftest import binance_data_dir
from tests.serve.test_ws_server import connect
from tradecanvas.wire.json import dumps, loads

pytestmark = pytest.mark.e2e

WEEK: Final = "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
BASE: Final = "binance:futures:BTC/USDT:1m"
FIVE: Final = "binance:futures:BTC/USDT:5m"
HISTORY_BARS: Final = 120  # before the stream: the start-up backfill fetches them over REST
WAIT_S: Final = 90.0


@attrs.define
class NewestBarWins:
    """The client's chart: per series, bars by open time; a candle older than the newest bar
    is ignored (a closed one too); ``factor.rebuild`` reloads its range over HTTP."""

    http: httpx.AsyncClient
    bars: dict[str, dict[int, dict[str, Any]]] = attrs.Factory(dict)
    ignored_closes: int = 0
    reloads: int = 0

    def newest(self, series_id: str) -> int | None:
        bars = self.bars.get(series_id)
        return max(bars) if bars else None

    def _apply(self, series_id: str, candle: dict[str, Any], *, closed: bool) -> None:
        newest = self.newest(series_id)
        t = candle["candle_time"]
        if newest is not None and t < newest:
            self.ignored_closes += closed
            return
        self.bars.setdefault(series_id, {})[t] = candle

    async def on_message(self, message: dict[str, Any]) -> None:
        kind, sid = message["type"], message.get("series_id", "")
        if kind == "candles_batch":
            for candle in message["candles"]:
                self._apply(sid, candle, closed=True)
        elif kind in ("candle_closed", "candle_forming"):
            self._apply(sid, message["candle"], closed=kind == "candle_closed")
        elif kind == "system" and message["event"] == "factor.rebuild":
            data = message["data"]
            await self._reload(sid, data["from_time"], data["to_time"])

    async def _reload(self, series_id: str, start: int, end: int) -> None:
        self.reloads += 1
        reply = await self.http.get(
            "/api/market/candles",
            params={"series_id": series_id, "since": start - 1, "limit": 5000},
        )
        reply.raise_for_status()
        bars = self.bars.setdefault(series_id, {})
        for candle in reply.json()["candles"]:
            if candle["candle_time"] <= end:
                bars[candle["candle_time"]] = candle


async def _follow(
    ws_port: int,
    client: NewestBarWins,
    done: trio.Event,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Subscribe to 1m and 5m (``since: null``, as a chart opening does); ``started()`` once
    the pong after the subscribes says both are registered; then apply every message."""
    async with connect(ws_port) as ws:
        for sid in (BASE, FIVE):
            await ws.send_message(dumps({"type": "subscribe", "series_id": sid, "since": None}))
        await ws.send_message(dumps({"type": "ping"}))
        started = False
        while not done.is_set():
            with trio.move_on_after(0.2):
                message = loads(await ws.get_message())
                if message["type"] == "pong" and not started:
                    started = True
                    task_status.started()
                await client.on_message(message)


async def _store(http: httpx.AsyncClient, series_id: str) -> dict[int, dict[str, Any]]:
    bars: dict[int, dict[str, Any]] = {}
    since = 0
    while True:
        reply = await http.get(
            "/api/market/candles", params={"series_id": series_id, "since": since, "limit": 5000}
        )
        candles = reply.json()["candles"]
        # the HTTP read's `complete: false` of a derived bar with minutes missing is not a
        # candle field: /ws/market sends the bar without it
        bars.update(
            (c["candle_time"], {k: v for k, v in c.items() if k != "complete"}) for c in candles
        )
        if len(candles) < 5000:
            return bars
        since = candles[-1]["candle_time"]


def _trimmed_week(tmp_path: Path, bars: int) -> tuple[Path, list[int]]:
    """The first ``bars`` rows of the real futures week (a test input in tmp, not a copy
    kept anywhere)."""
    with (binance_data_dir() / WEEK).open(newline="") as f:
        rows = list(csv.reader(f))
    header, body = rows[0], rows[1 : bars + 1]
    path = tmp_path / "BTCUSDT-1m-trimmed.csv"
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *body])
    return path, [int(r[0]) // 1000 for r in body]


@attrs.frozen
class Scenario:
    name: str
    streamed: int  # bars streamed after the REST history
    speed: str
    forming_per_bar: int
    faults: tuple[str, ...]


SCENARIOS: Final = (
    Scenario(
        "max speed, repaired closes, an exchange hole, duplicates",
        streamed=240,
        speed="max",
        forming_per_bar=3,
        faults=(
            "--omit-close-every", "17",
            "--duplicate-close-every", "13",
            f"--exchange-hole={HISTORY_BARS + 61}:2",
        ),
    ),
    Scenario(
        "forming every 250 ms of wall time, a repaired close",
        streamed=4,
        speed="4",  # 15 s bars with 60 forming frames: one every 250 ms, as Binance sends
        forming_per_bar=60,
        faults=("--omit-close", str(HISTORY_BARS + 1)),
    ),
)  # fmt: skip


def _ids(scenario: Scenario) -> str:
    return scenario.name.split(",")[0].replace(" ", "-")


@pytest.mark.parametrize("publish", ["0", "1"])
@pytest.mark.parametrize("scenario", SCENARIOS, ids=_ids)
async def test_a_newest_bar_wins_chart_ends_equal_to_the_store(
    tmp_path: Path, scenario: Scenario, publish: str
) -> None:
    data, times = _trimmed_week(tmp_path, HISTORY_BARS + scenario.streamed)
    with ExitStack() as stack:
        replay = stack.enter_context(
            run_cli(
                [
                    "replay", str(data), "--paused", "--speed", scenario.speed,
                    "--start-at", str(HISTORY_BARS),
                    "--forming-per-bar", str(scenario.forming_per_bar),
                    "--rest-429-first", "--retry-after", "1",
                    *scenario.faults,
                ],
                cli_env(),
                tmp_path / "replay.log",
            )
        )  # fmt: skip
        found = await wait_for_line(tmp_path / "replay.log", r"replay ws=(\S+) rest=(\S+)", replay)
        serve = stack.enter_context(
            run_cli(
                ["serve"],
                cli_env(
                    TRADE_CANVAS_DB_PATH=str(tmp_path / "market.sqlite3"),
                    TRADE_CANVAS_BINANCE_FUTURES_WS_URL=found.group(1),
                    TRADE_CANVAS_BINANCE_FUTURES_REST_URL=found.group(2),
                    TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH=publish,
                    TRADE_CANVAS_INITIAL_BACKFILL_CANDLES=str(HISTORY_BARS),
                    TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
                    TRADE_CANVAS_LATE_CLOSE_S="2",
                ),
                tmp_path / "serve.log",
            )
        )
        ready = await wait_for_line(
            tmp_path / "serve.log", r"ready ws=ws://[\d.]+:(\d+)/ws/market http=(\S+)", serve
        )
        ws_port, http_url = int(ready.group(1)), ready.group(2)
        async with httpx.AsyncClient(base_url=http_url) as http:
            early, late = NewestBarWins(http), NewestBarWins(http)
            done = trio.Event()
            async with trio.open_nursery() as nursery:
                with trio.fail_after(WAIT_S):
                    await nursery.start(_follow, ws_port, early, done)
                replay.send_signal(signal.SIGUSR1)
                # the first REST call gets a 429: the start-up backfill waits a second
                await wait_for_line(tmp_path / "serve.log", r"429", serve)
                nursery.start_soon(_follow, ws_port, late, done)
                with trio.fail_after(WAIT_S):
                    while True:
                        head = await _store_head(http, BASE)
                        # the last close is published right after it is stored
                        if (head or 0) >= times[-1] and all(
                            (c.newest(BASE) or 0) >= times[-1] for c in (early, late)
                        ):
                            break
                        await trio.sleep(0.1)
                await trio.sleep(0.5)  # let the last messages (5m bar, events) arrive
                done.set()
            for sid in (BASE, FIVE):
                stored = await _store(http, sid)
                assert stored, sid
                head = max(stored)
                for name, client in (("early", early), ("late", late)):
                    chart = {t: b for t, b in client.bars.get(sid, {}).items() if t <= head}
                    assert chart == stored, (
                        f"{name} client, {sid}: {len(chart)} bars vs {len(stored)} stored;"
                        f" differing: {_diff(chart, stored)[:5]};"
                        f" {client.ignored_closes} closes ignored as older than the newest bar"
                    )


async def _store_head(http: httpx.AsyncClient, series_id: str) -> int | None:
    series = (await http.get("/api/market/series")).json()["series"]
    return next((s["head_time"] for s in series if s["series_id"] == series_id), None)


def _diff(a: dict[int, Any], b: dict[int, Any]) -> list[int]:
    return sorted(t for t in a.keys() | b.keys() if a.get(t) != b.get(t))
