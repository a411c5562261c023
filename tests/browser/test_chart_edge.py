"""The chart page served by an edge (``serve --role edge``), which has no Binance connection of
its own: its stale badge says what the ingest node holding the lease reports through Redis
(docs/chart.md, Stale data; ``bus/ingest_report.py``). A real replay, ingest and edge, the
shared Redis under a key prefix of the test's own, a shared SQLite store."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import trio
from playwright.sync_api import Browser

from tests.browser.rig import (
    BASE,
    TOKEN,
    chart_page,
    trimmed_week,
    wait_for_line,
)
from tests.bus.conftest import SHARED_URL, delete_prefix, new_prefix, require_redis
from tests.cli_rig import cli_env, run_cli

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

HISTORY = 120
READY = r"tradecanvas ready ws=\S+ http=(\S+)"


@pytest.fixture
def prefix() -> Iterator[str]:
    """A bus prefix of this test's own on the shared Redis; its keys deleted afterwards."""
    require_redis()
    name = new_prefix()
    yield name
    trio.run(delete_prefix, SHARED_URL, name)


def test_the_badge_on_an_edge_says_what_the_ingest_reports(
    tmp_path: Path, browser: Browser, prefix: str
) -> None:
    data, bars = trimmed_week(tmp_path, HISTORY + 20)
    with ExitStack() as stack:
        replay = stack.enter_context(
            run_cli(
                ["replay", str(data), "--paused", "--speed", "max", "--start-at", str(HISTORY)],
                cli_env(),
                tmp_path / "replay.log",
            )
        )
        found = wait_for_line(tmp_path / "replay.log", r"replay ws=(\S+) rest=(\S+)", replay)
        env = cli_env(
            TRADE_CANVAS_DB_PATH=str(tmp_path / "shared.sqlite3"),
            TRADE_CANVAS_REDIS_URL=SHARED_URL,
            TRADE_CANVAS_BUS_PREFIX=prefix,
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=found.group(1),
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=found.group(2),
            TRADE_CANVAS_INITIAL_BACKFILL_CANDLES=str(HISTORY),
            TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
            TRADE_CANVAS_INGEST_LEASE_MS="1000",
            TRADE_CANVAS_INGEST_TOKEN=TOKEN,
        )
        ingest = stack.enter_context(
            run_cli(["serve", "--role", "ingest"], env, tmp_path / "i.log")
        )
        wait_for_line(tmp_path / "i.log", READY, ingest)
        edge = stack.enter_context(run_cli(["serve", "--role", "edge"], env, tmp_path / "e.log"))
        origin = wait_for_line(tmp_path / "e.log", READY, edge).group(1)
        with chart_page(browser, origin) as chart:
            chart.page.clock.install()
            chart.open(BASE)
            chart.wait_live()
            replay.send_signal(signal.SIGUSR1)  # the streamed minutes, through the bus
            chart.wait_until("(t) => window.tradecanvasChart.lastClosed() === t", bars[-1].time)
            # quiet, with Binance there: the age alone
            chart.page.clock.fast_forward(95_000)
            chart.wait_until("() => window.tradecanvasChart.state() === 'stale'")
            assert chart.call("() => window.tradecanvasChart.badge()").endswith(" s)")
            # Binance goes away: the ingest reports it, the edge passes it on
            replay.kill()
            replay.wait(timeout=30)
            chart.wait_until(
                "() => window.tradecanvasChart.badge().startsWith('stale: Binance unreachable · ')"
            )
            # the ingest node dies: its report expires with its lease
            ingest.kill()
            ingest.wait(timeout=30)
            chart.wait_until(
                "() => window.tradecanvasChart.badge()"
                ".startsWith('stale: no ingest node running · ')"
            )
            assert chart.call("() => window.tradecanvasChart.state()") == "stale"
            # the edge stays ready: it serves what is stored (no console error: no 503)
            assert chart.console_errors == []
            chart.screenshot("chart-edge-no-ingest")
