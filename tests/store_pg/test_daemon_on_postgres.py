"""``tradecanvas serve`` on PostgreSQL (``TRADE_CANVAS_DATABASE_URL``): the daemon's one store
is the PostgreSQL one, the replay's backfill and the strict HTTP write land in the database,
and the HTTP API reads them back. Real parts: the replay stands in for Binance."""

from __future__ import annotations

import functools
from pathlib import Path

import httpx
import psycopg
import trio

from tests.conftest import binance_data_dir
from tests.test_daemon_wiring import BASE, HTTP_TIME, TOKEN, WEEK, post_candle
from tradecanvas.daemon import market_runtime_builder, run_daemon
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.store.postgres import PostgresStore
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, parse_file_argument, serve_replay


async def test_the_daemon_runs_on_postgresql(tmp_path: Path, pg_url: str) -> None:
    config = ReplayConfig(
        files=(parse_file_argument(str(binance_data_dir() / WEEK), "futures"),), start_at=60
    )
    async with trio.open_nursery() as nursery:
        replay: ReplayHandle = await nursery.start(serve_replay, config)
        flags = build_runtime_flags(
            {
                "TRADE_CANVAS_DB_PATH": str(tmp_path / "unused.sqlite3"),
                "TRADE_CANVAS_DATABASE_URL": pg_url,
                "TRADE_CANVAS_WS_PORT": "0",
                "TRADE_CANVAS_HTTP_PORT": "0",
                "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": replay.ws_url,
                "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": replay.rest_url,
                "TRADE_CANVAS_INITIAL_BACKFILL_CANDLES": "60",
                "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m",
                "TRADE_CANVAS_INGEST_TOKEN": TOKEN,
            }
        ).flags
        runtime = await market_runtime_builder(flags)
        store: object = runtime.store  # typed CandleStore by the daemon's cast (see there)
        assert isinstance(store, PostgresStore)
        stop = trio.Event()
        async with trio.open_nursery() as daemon:
            ports = await daemon.start(functools.partial(run_daemon, runtime, stop=stop))
            try:
                base = f"http://127.0.0.1:{ports['http']}"
                async with httpx.AsyncClient(base_url=base) as client:
                    answer = await post_candle(client, HTTP_TIME)
                    assert answer.status_code == 200, answer.text
                    read = await client.get(
                        "/api/market/candles",
                        params={"series_id": BASE, "since": HTTP_TIME - 60, "limit": 1},
                    )
                    ready = (await client.get("/readyz")).json()
            finally:
                stop.set()
        nursery.cancel_scope.cancel()
    await runtime.store.aclose()
    assert read.json()["candles"][0]["candle_time"] == HTTP_TIME
    assert ready["checks"]["store_open"] is True
    assert not (tmp_path / "unused.sqlite3").exists()
    with psycopg.connect(pg_url) as conn:
        row = conn.execute(
            "SELECT source, open::text FROM candles WHERE series_id = %s AND candle_time = %s",
            (BASE, HTTP_TIME),
        ).fetchone()
        events = conn.execute("SELECT count(*) FROM events").fetchone()
    assert row == ("http", "1")
    assert events is not None and int(events[0]) >= 1  # new_series at least, in the log
