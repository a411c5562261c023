"""``tradecanvas import`` beside a running ``tradecanvas serve`` on the same store: the live
subscriber gets the import's ``factor.rebuild`` (reason ``import``, the exact range) once,
then the daemon's own events as before, each once and in id order. Real CLI processes, a real
WS subscriber, the shared archive zips; SQLite and PostgreSQL."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import httpx
import pytest
import trio

from tests.cli_rig import cli_env, exit_code_within, run_cli, wait_for_line
from tests.conftest import binance_data_dir
from tests.serve.test_ws_server import connect, receive, send, until_pong
from tests.store_pg.conftest import Backend
from tests.tools.importer.rig import SPOT_1M, SPOT_5M, real_zips
from tradecanvas.store.types import StoredEvent
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, parse_file_argument, serve_replay
from tradecanvas.wire.kline_csv import read_kline_csv

TOKEN: Final = "import-live-test-token-0123"
DAY0: Final = 1577836800  # 2020-01-01T00:00Z, the first minute of the shared zips
LAST: Final = DAY0 + 3 * 86_400 - 60  # 2020-01-03T23:59Z, their last


async def stored_events(backend: Backend) -> list[StoredEvent]:
    store = await backend.open()
    try:
        return await store.events_after(0, None, 10_000)
    finally:
        await store.aclose()


@pytest.mark.e2e
async def test_a_running_daemon_publishes_an_imports_rebuild_once(
    tmp_path: Path, backend: Backend
) -> None:
    location = (
        {"TRADE_CANVAS_DB_PATH": str(backend.location)}
        if backend.name == "sqlite"
        else {
            "TRADE_CANVAS_DATABASE_URL": str(backend.location),
            "TRADE_CANVAS_DB_PATH": str(tmp_path / "unused.sqlite3"),
        }
    )
    env = cli_env(
        **location,
        TRADE_CANVAS_SERIES=SPOT_1M,
        TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
        TRADE_CANVAS_INGEST_TOKEN=TOKEN,
        # no Binance here: an unreachable loopback port keeps the ingest reconnecting
        TRADE_CANVAS_BINANCE_SPOT_WS_URL="ws://127.0.0.1:9",
        TRADE_CANVAS_BINANCE_SPOT_REST_URL="http://127.0.0.1:9",
    )
    serve_log, import_log = tmp_path / "serve.log", tmp_path / "import.log"
    with run_cli(["serve"], env, serve_log) as serve:
        ready = await wait_for_line(
            serve_log, r"ready ws=ws://[\d.]+:(\d+)/ws/market http=http://[\d.]+:(\d+)", serve
        )
        ws_port, http_port = int(ready.group(1)), int(ready.group(2))
        async with connect(ws_port) as ws:
            for sid in (SPOT_1M, SPOT_5M):
                await send(ws, {"type": "subscribe", "series_id": sid})
            await until_pong(ws)  # both subscriptions are in place
            with run_cli(["import", *map(str, real_zips())], env, import_log) as importer:
                assert await exit_code_within(importer, within=120) == 0, import_log.read_text()
            system: list[dict[str, Any]] = []
            with trio.fail_after(30):
                while len(system) < 2:
                    message = await receive(ws)
                    if message["type"] == "system":
                        system.append(message)
            # the daemon's own event after it: a revision of an imported minute (HTTP write)
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{http_port}") as client:
                candle = {"candle_time": DAY0, "open": 1, "high": 1, "low": 1, "close": 1}
                answer = await client.post(
                    "/api/market/ingest/candle_closed",
                    json={"series_id": SPOT_1M, "candle": {**candle, "volume": 1}},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                assert answer.status_code == 200, answer.text
            with trio.fail_after(30):
                while len(system) < 4:
                    message = await receive(ws)
                    if message["type"] == "system":
                        system.append(message)
            system += [m for m in await until_pong(ws) if m["type"] == "system"]
    logged = await stored_events(backend)
    imported = {e.series_id: e for e in logged if e.data.get("reason") == "import"}
    # each series' import event once, with the exact range, before the daemon's own events
    received = [(m["series_id"], m["data"]["reason"], m["event_id"]) for m in system]
    assert sorted(received[:2]) == sorted(
        (sid, "import", imported[sid].event_id) for sid in (SPOT_1M, SPOT_5M)
    )
    assert [(r[0], r[1]) for r in received[2:]] == [(SPOT_1M, "revision"), (SPOT_5M, "revision")]
    by_series = {m["series_id"]: m for m in system[:2]}
    assert (by_series[SPOT_1M]["data"]["from_time"], by_series[SPOT_1M]["data"]["to_time"]) == (
        DAY0,
        LAST,
    )
    assert (by_series[SPOT_5M]["data"]["from_time"], by_series[SPOT_5M]["data"]["to_time"]) == (
        DAY0,
        LAST - 4 * 60,
    )
    # per series, the ids come in order
    for sid in (SPOT_1M, SPOT_5M):
        ids = [m["event_id"] for m in system if m["series_id"] == sid]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert "from another process published" in serve_log.read_text()


WEEK: Final = 1_751_760_000  # 2025-07-06, the 7-day futures files
FUTURES_1M: Final = "binance:futures:BTC/USDT:1m"


@pytest.mark.e2e
async def test_a_running_daemon_publishes_a_backfills_events_once(tmp_path: Path) -> None:
    """``tradecanvas backfill`` in its own process (Binance REST played by the replay)."""
    db = tmp_path / "m.sqlite3"
    env = cli_env(
        TRADE_CANVAS_DB_PATH=str(db),
        TRADE_CANVAS_SERIES=FUTURES_1M,
        TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL="ws://127.0.0.1:9",
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL="http://127.0.0.1:9",
    )
    week = binance_data_dir() / "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
    config = ReplayConfig(files=(parse_file_argument(str(week), None),), speed=None, start_at=180)
    serve_log = tmp_path / "serve.log"
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        with run_cli(["serve"], env, serve_log) as serve:
            ready = await wait_for_line(serve_log, r"ready ws=ws://[\d.]+:(\d+)/ws/market", serve)
            async with connect(int(ready.group(1))) as ws:
                await send(ws, {"type": "subscribe", "series_id": FUTURES_1M})
                await until_pong(ws)
                # the daemon's own series.added before: not the backfill's
                before = max(e.event_id for e in await stored_events(Backend("sqlite", db)))
                args = ["backfill", FUTURES_1M, "--from", str(WEEK), "--to", str(WEEK + 7200)]
                backfill_env = {**env, "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": replay.rest_url}
                log = tmp_path / "backfill.log"
                with run_cli(args, backfill_env, log) as backfill:
                    assert await exit_code_within(backfill, within=120) == 0, log.read_text()
                logged = [
                    e
                    for e in await stored_events(Backend("sqlite", db))
                    if e.series_id == FUTURES_1M and e.event_id > before
                ]
                assert logged  # the backfill's events for the series (new_series at least)
                system: list[dict[str, Any]] = []
                with trio.fail_after(30):
                    while len(system) < len(logged):
                        message = await receive(ws)
                        if message["type"] == "system":
                            system.append(message)
                system += [m for m in await until_pong(ws) if m["type"] == "system"]
        nursery.cancel_scope.cancel()
    assert [(m["event_id"], m["event"], m["data"]) for m in system] == [
        (e.event_id, e.event, e.data) for e in logged
    ]


@pytest.mark.e2e
async def test_a_backfill_beside_the_daemon_reaches_its_forming_day_bar(tmp_path: Path) -> None:
    """The daemon starts on an empty store at 12:00 with an hour of REST history: its stored
    history starts at 11:00, inside the day, so it sends no forming 1d bar (Binance's holds
    minutes the store lacks). ``tradecanvas backfill`` of the day's morning beside it: the
    forming 1d bar goes out from the next forming minute, Binance's day — its open at 00:00,
    its high and low over every minute — without a restart (before, only from the next
    start of the daemon)."""
    day = WEEK + 86_400  # 2025-07-07
    noon = day + 12 * 3600
    week = binance_data_dir() / "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
    rows = {c.candle_time: c for c in read_kline_csv(week)}
    db = tmp_path / "m.sqlite3"
    config = ReplayConfig(
        files=(parse_file_argument(str(week), None),),
        speed=30.0,  # a minute every 2 s: the day goes on for the whole test
        forming_per_bar=2,
        start_at=(noon - WEEK) // 60,
    )
    futures_1d = FUTURES_1M.replace(":1m", ":1d")
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        env = cli_env(
            TRADE_CANVAS_DB_PATH=str(db),
            TRADE_CANVAS_SERIES=FUTURES_1M,
            TRADE_CANVAS_DERIVED_TIMEFRAMES="5m,1d",
            TRADE_CANVAS_INITIAL_BACKFILL_CANDLES="60",
            TRADE_CANVAS_MARKET_FORMING_MIN_INTERVAL_MS="0",
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=replay.ws_url,
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=replay.rest_url,
        )
        serve_log = tmp_path / "serve.log"
        with run_cli(["serve"], env, serve_log) as serve:
            ready = await wait_for_line(serve_log, r"ready ws=ws://[\d.]+:(\d+)/ws/market", serve)
            async with connect(int(ready.group(1))) as ws:
                for sid in (FUTURES_1M.replace(":1m", ":5m"), futures_1d):
                    await send(ws, {"type": "subscribe", "series_id": sid})
                fives = 0
                with trio.fail_after(60):
                    while fives < 3:  # live forming bars flow; none of the day yet
                        message = await receive(ws)
                        assert (message["type"], message.get("series_id")) != (
                            "candle_forming",
                            futures_1d,
                        ), message
                        fives += message["type"] == "candle_forming"
                stored = await stored_events(Backend("sqlite", db))
                assert stored  # the daemon's own new_series events: its history is in
                args = ["backfill", FUTURES_1M, "--from", str(day), "--to", str(noon - 3600)]
                log = tmp_path / "backfill.log"
                with run_cli(args, env, log) as backfill:
                    assert await exit_code_within(backfill, within=120) == 0, log.read_text()
                with trio.fail_after(60):
                    while True:
                        message = await receive(ws)
                        if (message["type"], message.get("series_id")) == (
                            "candle_forming",
                            futures_1d,
                        ):
                            break
        nursery.cancel_scope.cancel()
    bar = message["candle"]
    assert bar["candle_time"] == day
    morning = [rows[t] for t in range(day, noon, 60)]  # the minutes before the live ones
    assert bar["open"] == float(rows[day].open)
    assert bar["high"] >= max(float(c.high) for c in morning)
    assert bar["low"] <= min(float(c.low) for c in morning)
    assert "history stored by another process taken into the forming bars" in (
        serve_log.read_text()
    )
