"""Connections refused at accept (``tradecanvas.serve.shedding``): the HTTP port caps the
connections that are not /ws/market sessions, both ports share one budget of client
sockets, and the daemon raises its open-file limit and says when the budget is short.

Raw TCP connections on real sockets (127.0.0.1, port 0) against the real endpoint and
Hypercorn; the daemon itself in a subprocess under ``prlimit``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.serve.test_ws_admission import (
    UPGRADE,
    closed_unanswered,
    raw_streams,
    sample,
    status_of,
    until,
)
from tests.serve.test_ws_server import Market, running_market
from tradecanvas.serve.shedding import RESERVED_DESCRIPTORS, ClientSockets
from tradecanvas.store.sqlite import CandleStore

GET: bytes = b"GET /nowhere HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    yield opened
    await opened.aclose()


def http_open(market: Market) -> float:
    return sample(market, "tradecanvas_http_connections")


def http_shed(market: Market) -> float:
    return sample(market, "tradecanvas_http_connections_shed_total")


def ws_shed(market: Market) -> float:
    return sample(market, "tradecanvas_ws_handshakes_shed_total")


async def test_http_connections_beyond_the_cap_are_shed_and_a_session_leaves_the_count(
    store: CandleStore,
) -> None:
    cap = 3
    async with (
        running_market(store, over="http_port", max_http_connections=cap) as market,
        raw_streams(market.port, cap) as idle,
    ):
        await until(lambda: http_open(market) == cap)
        assert await closed_unanswered(market.port)
        assert await closed_unanswered(market.port)
        assert (http_shed(market), http_open(market)) == (2, cap)
        # one of them upgrades: a session now, under max_connections, not the port's cap
        await idle[0].send_all(UPGRADE)
        assert await status_of(idle[0]) == 101
        await until(lambda: http_open(market) == cap - 1)
        async with raw_streams(market.port, 1) as (late,):
            await late.send_all(GET)
            assert await status_of(late) == 404  # served: Starlette's answer
        # closing the idle ones gives their places back
        for stream in idle[1:]:
            await stream.aclose()
        await until(lambda: http_open(market) == 0)
        assert http_shed(market) == 2


async def test_both_ports_share_the_budget_of_client_sockets(store: CandleStore) -> None:
    sockets = ClientSockets(4)
    async with running_market(store, over="http_port", sockets=sockets) as market:
        assert market.http_port is not None
        async with (
            raw_streams(market.ws_port, 2) as on_ws,
            raw_streams(market.http_port, 2),
        ):
            await until(lambda: sockets.count == 4)
            assert await closed_unanswered(market.ws_port)
            assert await closed_unanswered(market.http_port)
            assert (ws_shed(market), http_shed(market)) == (1, 1)
            # a WebSocket session still counts against the budget
            await on_ws[0].send_all(UPGRADE)
            assert await status_of(on_ws[0]) == 101
            assert await closed_unanswered(market.http_port)
            # a place given back on one port is taken on the other
            await on_ws[0].aclose()
            await until(lambda: sockets.count == 3)
            async with raw_streams(market.http_port, 1) as (late,):
                await late.send_all(GET)
                assert await status_of(late) == 404
            # on_ws[1] ends during its handshake: its place is free at once as well
        await until(lambda: sockets.count == 0)


PRLIMIT = shutil.which("prlimit")


def run_limited(nofile: str, code: str) -> subprocess.CompletedProcess[str]:
    assert PRLIMIT is not None
    return subprocess.run(
        [PRLIMIT, f"--nofile={nofile}", sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )


@pytest.mark.skipif(PRLIMIT is None, reason="needs util-linux's prlimit")
def test_the_open_file_limit_is_raised_and_a_short_budget_is_said() -> None:
    code = (
        "import logging, resource\n"
        "logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')\n"
        "from tradecanvas.serve.shedding import ClientSockets\n"
        "sockets = ClientSockets.within_open_files_limit({planned})\n"
        "print(sockets.limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0])\n"
    )
    short = run_limited("512:2048", code.format(planned=11_000))
    assert short.stdout.split() == [str(2048 - RESERVED_DESCRIPTORS), "2048"]
    assert "WARNING the open-file limit is 2048" in short.stderr
    assert "where the settings allow for 11000" in short.stderr
    enough = run_limited("512:20000", code.format(planned=11_000))
    assert enough.stdout.split() == [str(20000 - RESERVED_DESCRIPTORS), "20000"]
    assert "WARNING" not in enough.stderr
