"""Slow consumers with real clients that stop reading (DESIGN §6), on both ports: a stuck
client is closed with 4008 within the stall timeout and, when it reads again, even after the
daemon has closed the TCP connection, gets what was sent before in order and then the 4008
close frame; a client that pauses for less, or reads slowly but keeps up, is never closed; the
healthy clients beside them get everything in order.

Real trio-websocket clients with default kernel buffers against real servers on 127.0.0.1 and
a real SQLite store, under a mock clock that jumps ahead when idle (the stall timeout passes
in no real time; see the ``clock`` fixture).
The budget and the stall clock themselves: tests/serve/test_in_flight.py.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final

import pytest
import trio
import trio.testing
import trio_websocket

from tests.conftest import flat_minutes
from tests.serve.test_ws_server import (
    SID_1M,
    TRANSPORTS,
    Market,
    closed_times,
    connect,
    running_market,
    send,
    subscribe_msg,
)
from tradecanvas.serve.in_flight import InFlight
from tradecanvas.serve.stall_watch import SEND_SLACK, STALL_SAMPLES
from tradecanvas.serve.subscriber import Subscriber
from tradecanvas.serve.ws_session import CLOSE_TIMEOUT_S
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.json import loads

T0: Final = 1751760000
STALL_S: Final = 5.0
# real seconds the test is idle before the virtual clock jumps to the next deadline
AUTOJUMP_S: Final = 0.01
# far more than the kernel buffers of a client that stops reading hold (about 2 MB)
CATCH_UP: Final = 20_000


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    await opened.upsert(SID_1M, list(flat_minutes(T0, CATCH_UP, price="108123.45")), "ws")
    yield opened
    await opened.aclose()


@pytest.fixture
def clock() -> trio.testing.MockClock:
    """Virtual time that jumps ahead once the test has been idle for 10 ms of real time:
    not while the daemon reads the store in a thread (trio's autojump_clock would run the
    stall timeout out in the meantime), and stall timeouts still pass in no time."""
    return trio.testing.MockClock(autojump_threshold=AUTOJUMP_S)


def expected_times(count: int = CATCH_UP) -> list[int]:
    return [T0 + 60 * i for i in range(count)]


async def read_all(ws: trio_websocket.WebSocketConnection, count: int) -> list[int]:
    """The candle times of the next ``count`` closed candles. No deadline: the autojump
    clock runs ahead while the daemon reads the store in a thread."""
    times: list[int] = []
    while len(times) < count:
        times.extend(closed_times([loads(await ws.get_message())]))
    return times


async def read_until_closed(
    ws: trio_websocket.WebSocketConnection,
) -> tuple[list[dict[str, Any]], int | None]:
    """Everything the client still gets, and the close code that ends it."""
    messages: list[dict[str, Any]] = []
    try:
        while True:
            messages.append(loads(await ws.get_message()))
    except trio_websocket.ConnectionClosed as exc:
        return messages, exc.reason.code if exc.reason is not None else None


def slow_closes(market: Market, cause: str) -> float:
    text = market.metrics.render().decode()
    line = f'tradecanvas_slow_consumer_closes_total{{cause="{cause}"}} '
    (value,) = [row[len(line) :] for row in text.splitlines() if row.startswith(line)]
    return float(value)


def all_slow_closes(market: Market) -> float:
    """Slow-consumer closes of either cause."""
    return sum(slow_closes(market, cause) for cause in ("stalled", "send_timeout"))


async def reads_it_all_never_closed(
    market: Market, client: trio_websocket.WebSocketConnection, subscriber: Subscriber
) -> None:
    """The client, reading again, gets the whole catch-up in order; it was never closed."""
    assert await read_all(client, CATCH_UP) == expected_times()
    assert subscriber.close_code is None
    assert all_slow_closes(market) == 0


@asynccontextmanager
async def one_client_not_reading(
    store: CandleStore,
    over: str,
    *,
    send_timeout_s: float,
    stall_timeout_s: float = STALL_S,
    since: int = T0 - 60,
    batch: bool = True,
    receive_buffer: int | None = None,
) -> AsyncIterator[tuple[Market, trio_websocket.WebSocketConnection, Subscriber]]:
    """A market (catch-up limit 100) and one client with a 1-message queue, subscribed to
    SID_1M from ``since``, that reads nothing until the test reads from it: the market, the
    client and the daemon's subscriber for it."""
    async with (
        running_market(
            store,
            catchup_limit=100,
            send_timeout_s=send_timeout_s,
            stall_timeout_s=stall_timeout_s,
            over=over,
        ) as market,
        connect(
            market.port, receive_buffer=receive_buffer, message_queue_size=1, quick_ack=True
        ) as client,
    ):
        await send(client, subscribe_msg(SID_1M, since=since, batch=batch))
        await market.hub.wait_subscribers(1)
        (subscriber,) = market.hub.subscribers()
        yield market, client, subscriber


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_stuck_client_is_closed_within_the_stall_time_and_gets_its_4008(
    store: CandleStore, over: str, clock: trio.testing.MockClock
) -> None:
    async with (
        running_market(
            store, catchup_limit=100, send_timeout_s=3600, stall_timeout_s=STALL_S, over=over
        ) as market,
        connect(market.port, message_queue_size=1, quick_ack=True) as stuck,
        connect(market.port, quick_ack=True) as healthy,
    ):
        await send(stuck, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        await market.hub.wait_subscribers(2)
        stuck_subscriber = market.hub.subscribers()[0]
        started = trio.current_time()
        await send(healthy, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        assert await read_all(healthy, CATCH_UP) == expected_times()

        await market.hub.wait_subscribers(1)
        closed_after = trio.current_time() - started
        assert stuck_subscriber.close_code == 4008
        assert stuck_subscriber.slow_cause == "stalled"
        # the stall clock errs early, by one sample at most; late by no more than the
        # time its buffers took to fill
        interval = STALL_S / STALL_SAMPLES
        assert STALL_S - interval <= closed_after <= STALL_S + 2 * interval
        assert slow_closes(market, "stalled") == 1.0

        # it reads again only after the daemon has given up on the close handshake and
        # closed the TCP connection: what was sent before, in order, then the 4008 frame
        await trio.sleep(CLOSE_TIMEOUT_S + 1)
        assert stuck_subscriber.in_flight is not None
        assert stuck_subscriber.in_flight.sock.fileno() == -1  # closed on the daemon's side
        messages, code = await read_until_closed(stuck)
        assert code == 4008
        times = closed_times(messages)
        assert 0 < len(times) < CATCH_UP
        assert times == expected_times(len(times))
        # the healthy client is still served
        assert market.hub.subscribers()[0].close_code is None


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_client_that_pauses_for_less_than_the_stall_time_is_not_closed(
    store: CandleStore, over: str, clock: trio.testing.MockClock
) -> None:
    async with one_client_not_reading(
        store,
        over,
        send_timeout_s=STALL_S,
    ) as (market, pausing, subscriber):
        await trio.sleep(0.6 * STALL_S)  # reads nothing: the catch-up backs up
        assert subscriber.in_flight is not None and subscriber.in_flight.behind_s > 0
        # /metrics shows it: bytes in flight, seconds behind
        text = market.metrics.render().decode()
        assert 'tradecanvas_subscriber_in_flight_bytes_bucket{le="0"} 0.0' in text
        assert 'tradecanvas_subscriber_behind_seconds_bucket{le="0"} 0.0' in text
        assert "tradecanvas_subscriber_behind_seconds_gcount 1.0" in text
        await reads_it_all_never_closed(market, pausing, subscriber)


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_slow_reader_that_keeps_up_is_never_closed(
    store: CandleStore, over: str, clock: trio.testing.MockClock
) -> None:
    """Live batches every second; the client takes most of a second over each message."""
    seconds = 20
    per_second = 200
    live_start = T0 + 60 * CATCH_UP
    async with (
        running_market(
            store, catchup_limit=1000, send_timeout_s=2, stall_timeout_s=2, over=over
        ) as market,
        connect(market.port, message_queue_size=1, quick_ack=True) as slow,
        connect(market.port, quick_ack=True) as healthy,
    ):
        for ws in (slow, healthy):
            await send(ws, subscribe_msg(SID_1M, since=live_start - 60, batch=True))
        await market.hub.wait_subscribers(2)

        async def produce() -> None:
            for second in range(seconds):
                candles = list(
                    flat_minutes(live_start + 60 * per_second * second, per_second, "108123.45")
                )
                await store.upsert(SID_1M, candles, "ws")
                market.hub.publish_closed(SID_1M, candles)
                await trio.sleep(1)

        async def read_slowly(into: list[int]) -> None:
            while len(into) < seconds * per_second:
                into.extend(closed_times([loads(await slow.get_message())]))
                await trio.sleep(0.8)

        slow_times: list[int] = []
        healthy_times: list[int] = []

        async def read_healthy() -> None:
            healthy_times.extend(await read_all(healthy, seconds * per_second))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(produce)
            nursery.start_soon(read_slowly, slow_times)
            nursery.start_soon(read_healthy)
        want = [live_start + 60 * i for i in range(seconds * per_second)]
        assert slow_times == want
        assert healthy_times == want
        assert [s.close_code for s in market.hub.subscribers()] == [None, None]


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_stuck_client_with_a_large_receive_buffer_is_closed_within_the_stall_time(
    store: CandleStore, over: str, clock: trio.testing.MockClock
) -> None:
    """A client with a 4 MB receive buffer stops reading while live candles trickle in (two a
    second, a few KB in all): its kernel takes and acknowledges every byte, so nothing stays
    unacknowledged at the TCP level and the buffers are nowhere near full. The daemon's pings,
    which the client no longer answers, still show it read nothing: closed with 4008 within
    the stall time of its last read, whatever its buffers; and when it reads again it gets
    everything sent before, in order, then the 4008 close frame."""
    live_start = T0 + 60 * CATCH_UP
    async with one_client_not_reading(
        store,
        over,
        send_timeout_s=3600,
        since=live_start - 60,
        batch=False,
        receive_buffer=4 * 1024 * 1024,
    ) as (market, stuck, subscriber):
        assert subscriber.in_flight is not None
        published: list[int] = []
        # (when each candle was published, the bytes written to the client before it)
        marks: list[tuple[float, int]] = []
        with trio.fail_after(10 * STALL_S):
            while subscriber.close_code is None:
                candles = list(flat_minutes(live_start + 60 * len(published), 1, "108123.45"))
                # the clock stands still while the store writes in a thread: under load that
                # takes over the 10 ms after which it would jump, to the deadline of the
                # close handshake (2 s on) once the close is decided, and closed_at would
                # count the jump
                clock.autojump_threshold = math.inf
                await store.upsert(SID_1M, candles, "ws")
                clock.autojump_threshold = AUTOJUMP_S
                marks.append((trio.current_time(), subscriber.in_flight.written))
                market.hub.publish_closed(SID_1M, candles)
                published.append(candles[0].candle_time)
                await trio.sleep(0.5)
            closed_at = trio.current_time()  # at most 0.5 s after the close
            await market.hub.wait_subscribers(0)
        assert subscriber.close_code == 4008
        assert subscriber.slow_cause == "stalled"
        # its library read a message or a few (and answered the pings among them) before it
        # stopped: closed the stall time after the first candle it did not read, early by
        # no more than a sample, late by no more than a sample and the polling
        first_unread = next(t for t, written in marks if written >= subscriber.in_flight.proven)
        interval = STALL_S / STALL_SAMPLES
        assert STALL_S - interval <= closed_at - first_unread <= STALL_S + 2 * interval + 0.5
        assert subscriber.in_flight.written < 64 * 1024  # nowhere near any buffer's size
        assert slow_closes(market, "stalled") == 1.0

        messages, code = await read_until_closed(stuck)
        assert code == 4008
        times = closed_times(messages)
        assert times == published[: len(times)]
        assert len(times) >= len(published) - 1  # all but one publish racing the close


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_pause_of_the_daemon_during_a_blocked_send_closes_no_client(
    store: CandleStore, over: str, clock: trio.testing.MockClock
) -> None:
    """The daemon stopped (SIGSTOP, a frozen VM) for longer than the send timeout while a
    write to a client was blocked on its full socket: the pause counts against no send
    either (a trio deadline expired on resuming before the stall watch could tell the
    pause, and the client was closed with 4008 ``a send took longer than …``)."""
    async with one_client_not_reading(
        store,
        over,
        send_timeout_s=STALL_S,
    ) as (market, pausing, subscriber):
        await trio.sleep(0.3 * STALL_S)  # reads nothing: a write of the catch-up blocks
        assert subscriber.in_flight is not None and subscriber.in_flight.behind_s > 0
        clock.jump(3 * STALL_S)  # nothing runs meanwhile: the whole process paused
        await reads_it_all_never_closed(market, pausing, subscriber)


# a stall timeout raised for clients on mobile links (allowed up to 3600 s): the sweep
# samples the stall clocks every 60 s
LONG_STALL_S: Final = 600.0


async def blocked_write(in_flight: InFlight, step_s: float) -> None:
    """Until a write of the publish task has been in progress for ``step_s`` (the client
    reads nothing: one blocks soon; the daemon may read the store in a thread before it)."""
    seen = math.inf
    while seen == math.inf or in_flight.send_deadline != seen:
        seen = in_flight.send_deadline
        await trio.sleep(step_s)


@pytest.mark.parametrize("over", TRANSPORTS)
@pytest.mark.parametrize(
    ("send_timeout_s", "stall_timeout_s"),
    [(STALL_S, 4 * STALL_S), (1.0, LONG_STALL_S)],
    ids=["default-like", "long-stall"],
)
async def test_a_send_over_the_send_timeout_is_cut_at_it_whatever_the_stall_timeout(
    store: CandleStore,
    over: str,
    send_timeout_s: float,
    stall_timeout_s: float,
    clock: trio.testing.MockClock,
) -> None:
    """The stall watch's sweep enforces the send timeout (the stall timeout, far off, is not
    what cuts here): a client that stops reading is closed with 4008 for its blocked send at
    its deadline — also a send timeout of 1 s beside a stall timeout of 600 s, which was cut
    at the sweep's next tick of the stall clocks, 60 s on."""
    async with one_client_not_reading(
        store, over, send_timeout_s=send_timeout_s, stall_timeout_s=stall_timeout_s
    ) as (market, _, subscriber):
        started = trio.current_time()
        await market.hub.wait_subscribers(0)
        closed_at = trio.current_time()
        assert subscriber.slow_cause == "send_timeout"
        assert (
            subscriber.close_reason == f"slow consumer: a send took longer than {send_timeout_s:g}s"
        )
        assert closed_at - started <= 2 * send_timeout_s
        # counted from the start of the write that was cut: late by SEND_SLACK of it at most
        assert subscriber.in_flight is not None
        took = closed_at - subscriber.in_flight.send_started
        assert send_timeout_s <= took <= send_timeout_s * (1 + SEND_SLACK)
        assert slow_closes(market, "send_timeout") == 1.0


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_pause_of_the_daemon_during_a_blocked_send_closes_no_client_whatever_the_stall_timeout(  # noqa: E501
    store: CandleStore, over: str, clock: trio.testing.MockClock
) -> None:
    """As above, and the daemon stops for 100 s while the send is blocked: longer than the
    send timeout and than a tick of the stall clocks (60 s), shorter than what shows a pause
    to the stall clocks (a quarter of the stall timeout). The pause counts against no send:
    the client reads everything once the daemon runs again."""
    send_timeout_s = 1.0
    async with one_client_not_reading(
        store, over, send_timeout_s=send_timeout_s, stall_timeout_s=LONG_STALL_S
    ) as (market, pausing, subscriber):
        assert subscriber.in_flight is not None
        await blocked_write(subscriber.in_flight, send_timeout_s / 10)
        clock.jump(LONG_STALL_S / 6)  # nothing runs meanwhile: the whole process paused
        assert await read_all(pausing, CATCH_UP) == expected_times()
        assert subscriber.close_code is None
        assert sum(slow_closes(market, c) for c in ("stalled", "send_timeout")) == 0
