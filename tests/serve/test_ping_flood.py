"""A client's pings have a limit (``tradecanvas.serve.client_frames``): the rule itself with
explicit times, then a real client flooding pings on each port — closed with 1008 — while a
calm client on the same endpoint goes on being served."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from wsproto.events import CloseConnection
from wsproto.frame_protocol import FrameProtocol

from tests.serve.test_client_faults import send_raw
from tests.serve.test_ws_server import (
    RECEIVE_TIMEOUT_S,
    TRANSPORTS,
    connect,
    running_market,
    until_pong,
)
from tradecanvas.serve.client_frames import (
    PING_FLOOD,
    PINGS_BURST,
    PINGS_PER_S,
    PingFlood,
    ping_limit,
)
from tradecanvas.store.sqlite import CandleStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    s = await CandleStore.open(tmp_path / "market.sqlite3")
    yield s
    await s.aclose()


def test_pings_within_the_rate_pass_and_a_flood_does_not() -> None:
    now = [0.0]  # the clock the limit reads
    burst = ping_limit(lambda: now[0])
    for _ in range(PINGS_BURST):  # a burst, saved up
        burst()
    with pytest.raises(PingFlood, match=PING_FLOOD):
        burst()
    now[0] = 1.0 / PINGS_PER_S
    burst()  # the bucket fills again
    steady_now = [0.0]
    steady = ping_limit(lambda: steady_now[0])
    for i in range(600 * PINGS_PER_S):  # at the rate for ten minutes: never refused
        steady_now[0] = i / PINGS_PER_S
        steady()


async def flood(port: int, pings: int) -> list[object]:
    """A raw WebSocket client that sends ``pings`` ping frames in one write once the 101 is
    in, then reads until the server ends the connection: the events it read."""
    client = FrameProtocol(client=True, extensions=[])
    return await send_raw(port, b"".join(bytes(client.ping(b"%d" % i)) for i in range(pings)))


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_ping_flood_is_closed_with_1008_and_a_calm_client_is_served(
    store: CandleStore, over: str
) -> None:
    async with running_market(store, over=over) as market, connect(market.port) as calm:
        # a client library's keep-alive pings are answered
        for _ in range(3):
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                await calm.ping()
        events = await flood(market.port, pings=PINGS_BURST + 30)
        closes = [e for e in events if isinstance(e, CloseConnection)]
        assert [(c.code, c.reason) for c in closes] == [(1008, PING_FLOOD)], events
        # the calm client on the same endpoint still gets its answers
        with trio.fail_after(RECEIVE_TIMEOUT_S):
            assert await until_pong(calm) == []  # nothing subscribed: the pong alone
