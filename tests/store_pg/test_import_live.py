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
