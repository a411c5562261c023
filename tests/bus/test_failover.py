"""Two ingest nodes for the same series (issue 15 item 4; ``bus/lease.py``): real
``tradecanvas serve --role ingest`` subprocesses on real Redis and PostgreSQL, ``tradecanvas
replay`` as Binance, an edge with a subscriber. SIGKILL of the node that ingests mid-run:
the standby takes the lease over and repairs from the store through REST; the subscriber
gets every closed 1m and 5m candle exactly once, in order, equal to Binance's, and the
store ends equal to the source."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.bus.cluster import paused_replay, roles_env
from tests.bus.roles_rig import (
    BASE,
    FIVE,
    HISTORY_BARS,
    WAIT_S,
    metric,
    metrics_text,
    ready,
    readyz,
    same,
    source,
)
from tests.cli_rig import run_cli, wait_for_line
from tests.recording_subscriber import Subscriber
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.model import Candle
from tradecanvas.store.postgres import PostgresStore

LEASE_MS: Final = 2_000
TOOK_OVER: Final = r"ingest lease: node (\S+) took the lease over \(fence (\d+)"


@pytest.mark.e2e
async def test_sigkill_of_the_ingesting_node_leaves_no_hole_and_no_duplicate(
    tmp_path: Path, redis_url: str, keys: StreamKeys, pg_url: str
) -> None:
    data = source(tmp_path)
    async with paused_replay(tmp_path, data) as replay:
        env = roles_env(
            replay,
            redis_url=redis_url,
            prefix=keys.prefix,
            database_url=pg_url,
            TRADE_CANVAS_INGEST_LEASE_MS=str(LEASE_MS),
        )
        logs = {name: tmp_path / f"{name}.log" for name in ("ingest-1", "ingest-2", "edge")}
        with run_cli(["serve", "--role", "ingest"], env, logs["ingest-1"]) as first:
            _, first_http = await ready(logs["ingest-1"], first)
            took = await wait_for_line(logs["ingest-1"], TOOK_OVER, first)
            assert took.group(2) == "1"
            with run_cli(["serve", "--role", "ingest"], env, logs["ingest-2"]) as second:
                _, second_http = await ready(logs["ingest-2"], second)
                await wait_for_line(logs["ingest-2"], r"this node stands by", second)
                standby = await metrics_text(second_http)
                assert metric(standby, "tradecanvas_ingest_leader") == 0.0
                assert 'tradecanvas_role_info{role="ingest"} 1.0' in standby
                assert metric(await metrics_text(first_http), "tradecanvas_ingest_leader") == 1.0
                # a standby holds no Binance connection and is ready as what it is
                status, doc = await readyz(second_http)
                assert status == 200 and "upstream_connected" not in doc["checks"], doc
                with run_cli(["serve", "--role", "edge"], env, logs["edge"]) as edge:
                    edge_ws, _ = await ready(logs["edge"], edge)
                    sub = Subscriber()
                    both = [{"type": "subscribe", "series_id": s, "since": 0} for s in (BASE, FIVE)]
                    async with trio.open_nursery() as nursery:
                        await nursery.start(sub.run, edge_ws, both)
                        replay.proc.send_signal(signal.SIGUSR1)
                        # mid-run: a third of the streamed bars reached the subscriber
                        mid = data.minutes[HISTORY_BARS + 80].candle_time
                        assert await sub.wait_until(lambda: mid in sub.times(BASE), WAIT_S)
                        first.send_signal(signal.SIGKILL)
                        await trio.to_thread.run_sync(first.wait)
                        took = await wait_for_line(logs["ingest-2"], TOOK_OVER, second)
                        assert took.group(2) == "2"  # the next fencing token
                        last, last5 = data.minutes[-1].candle_time, data.fives[-1].candle_time
                        assert await sub.wait_until(lambda: last in sub.times(BASE), WAIT_S)
                        assert await sub.wait_until(lambda: last5 in sub.times(FIVE), WAIT_S)
                        nursery.cancel_scope.cancel()
                    assert same(sub.closed(BASE), data.minutes), sub.times(BASE)
                    assert same(sub.closed(FIVE), data.fives), sub.times(FIVE)
                    assert not [m for m in sub.messages if m["type"] in ("gap", "error")]
                    after = await metrics_text(second_http)
                    assert metric(after, "tradecanvas_ingest_leader") == 1.0
                    assert metric(after, "tradecanvas_ingest_takeovers_total") == 1.0
                    for proc in (edge, second):
                        proc.send_signal(signal.SIGTERM)
                        assert await trio.to_thread.run_sync(proc.wait) == 0
    store = await PostgresStore.open(pg_url)
    try:
        assert ohlcv(await store.since(BASE, -1, 10_000)) == ohlcv(data.minutes)
        assert ohlcv(await store.since(FIVE, -1, 10_000)) == ohlcv(data.fives)
        # the start's events once each (the first history's rebuild is reason new_series):
        # the takeover doubled none and added neither a gap nor a rebuild
        events = [
            (e.event, e.series_id, e.data.get("reason"))
            for e in await store.events_after(0, limit=1_000)
        ]
        assert sorted(events) == sorted(
            [("series.added", s, "configured") for s in (BASE, FIVE)]
            + [("factor.rebuild", s, "new_series") for s in (BASE, FIVE)]
        ), events
    finally:
        await store.aclose()


def ohlcv(candles: list[Candle]) -> list[tuple[object, ...]]:
    """What the kline CSV holds of each bar, exactly (the decimals as stored)."""
    return [(c.candle_time, c.open, c.high, c.low, c.close, c.volume) for c in candles]
