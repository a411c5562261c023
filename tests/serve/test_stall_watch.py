"""The endpoint's stall watch (DESIGN §6): one sweep samples every connection's stall clock and
asks for its read proofs; a connection whose pings go unanswered is closed with 4008 after the
stall timeout, the others are not; the sweep carries on when the session running it ends; a
pong that has reached the daemon but is not yet counted does not close a healthy client. The
sweep also cuts the publish task's writes at their deadlines, whatever the stall timeout, and
a pause of the daemon counts against no write.

Real loopback connections: the daemon's side pings with a byte and a reader task of its own
takes the client's answers off the socket (two scheduling passes from the socket to the
proof, as with trio-websocket's reader). The session's use of the watch with real WebSocket
clients is tested in tests/serve/test_slow_consumers.py."""

from __future__ import annotations

import functools
import os
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Final
from unittest import mock

import pytest
import trio
import trio.testing

from tests.serve.test_in_flight import loopback
from tests.serve.test_subscriber import make_subscriber
from tradecanvas.serve.in_flight import InFlight
from tradecanvas.serve.stall_watch import SEND_SLACK, STALL_SAMPLES, StallWatch
from tradecanvas.serve.subscriber import Subscriber

STALL_S: Final = 10.0
TICK_S: Final = STALL_S / STALL_SAMPLES
PING: Final = b"p"
PONG: Final = b"o"


class Connection:
    """One connection's daemon side (its subscriber, in-flight record and pings) and its
    client (which answers pings while ``answering``)."""

    def __init__(self, server: trio.socket.SocketType, client: trio.socket.SocketType) -> None:
        self.server = server
        self.client = client
        self.subscriber: Subscriber = make_subscriber()
        self.in_flight = InFlight(server, trio.current_time())
        self.answering = True
        # its session has ended (tests/serve/test_stall_watch.session)
        self.ended = trio.Event()
        self._answered = trio.Event()

    async def ping(self, payload: bytes) -> None:
        """The read proof's ping: a byte out; back once the reader has taken the answer."""
        self._answered = trio.Event()
        await self.server.send(PING)
        await self._answered.wait()

    async def read_pongs(self) -> None:
        """The daemon's reader: takes answers off the socket, one scheduling pass before
        the read-proof task counts them."""
        while await self.server.recv(1) == PONG:
            self._answered.set()

    async def answer_pings(self) -> None:
        while True:
            assert await self.client.recv(1) == PING
            if self.answering:
                await self.client.send(PONG)

    def write(self, n: int = 100) -> None:
        self.in_flight.note_written(n)


@asynccontextmanager
async def connection(nursery: trio.Nursery, *, answer: bool = True) -> AsyncIterator[Connection]:
    async with loopback() as (server, client):
        conn = Connection(server, client)
        nursery.start_soon(conn.read_pongs)
        nursery.start_soon(functools.partial(conn.in_flight.prove_reads, ping_bytes=1), conn.ping)
        if answer:
            nursery.start_soon(conn.answer_pings)
        yield conn


@asynccontextmanager
async def connections(*answer: bool) -> AsyncIterator[tuple[trio.Nursery, list[Connection]]]:
    """Connections whose clients answer pings (or not), and the nursery of their tasks
    (cancelled at the end)."""
    async with AsyncExitStack() as stack, trio.open_nursery() as nursery:
        conns = [await stack.enter_async_context(connection(nursery, answer=a)) for a in answer]
        yield nursery, conns
        nursery.cancel_scope.cancel()


async def session(watch: StallWatch, conn: Connection) -> None:
    """What the session does with the watch: watch its connection until it ends."""
    try:
        with conn.subscriber.cancel_scope:
            await watch.watch(conn.subscriber, conn.in_flight)
    finally:
        conn.ended.set()


async def writing(conns: list[Connection], every_s: float = 1.0) -> None:
    while True:
        for conn in conns:
            conn.write()
        await trio.sleep(every_s)


async def until_closed(conn: Connection) -> None:
    """Until ``conn``'s session has ended (bounded)."""
    with trio.fail_after(3 * STALL_S):
        await conn.ended.wait()


async def test_one_sweep_closes_the_connection_that_stops_reading_and_no_other(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = StallWatch(STALL_S)
    async with connections(True, True, True) as (nursery, conns):
        stopping = conns[1]
        for conn in conns:
            nursery.start_soon(session, watch, conn)
        nursery.start_soon(writing, conns)
        await trio.sleep(3 * STALL_S)
        assert watch.watched == 3
        assert [c.subscriber.close_code for c in conns] == [None, None, None]
        # the pings the sweep asked for were answered: nobody more than a ping interval
        # and a tick behind
        for conn in conns:
            assert conn.in_flight.behind(trio.current_time()) <= STALL_S / 2 + 2 * TICK_S
        stopping.answering = False
        stopped = trio.current_time()
        await until_closed(stopping)
        closed_after = trio.current_time() - stopped
        assert [c.subscriber.close_code for c in conns] == [None, 4008, None]
        assert stopping.subscriber.slow_cause == "stalled"
        # its last proof came at most a ping interval and a tick before it stopped
        assert STALL_S / 2 - 2 * TICK_S <= closed_after <= STALL_S + TICK_S


async def test_the_sweep_carries_on_when_the_session_running_it_ends(
    autojump_clock: trio.testing.MockClock,
) -> None:
    watch = StallWatch(STALL_S)
    async with connections(True, False) as (nursery, (leaving, stuck)):
        # the first session runs the sweep; it leaves before the other is due to be closed
        nursery.start_soon(session, watch, leaving)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(session, watch, stuck)
        start = trio.current_time()
        nursery.start_soon(writing, [leaving, stuck])
        await trio.sleep(STALL_S / 2)
        leaving.subscriber.cancel_scope.cancel()
        await trio.testing.wait_all_tasks_blocked()
        assert watch.watched == 1
        await until_closed(stuck)
        closed_at = trio.current_time()
    assert leaving.subscriber.close_code is None
    assert stuck.subscriber.close_code == 4008
    # the stuck client's first unproven byte was written at 0: closed at the timeout
    # (early by a tick at most, as the stall clock errs), counted from there
    assert STALL_S - TICK_S <= closed_at - start <= STALL_S + TICK_S


async def test_a_pong_received_but_not_yet_counted_does_not_close_a_healthy_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The sweep's tick comes when a late pong has reached the daemon's socket but not yet
    its reader: the client is over the timeout by the proofs counted so far, and is checked
    again once the loop has read what was pending; a client whose pong is not there is
    closed at that second look."""
    watch = StallWatch(STALL_S)
    async with connections(False, False) as (_, conns):
        late, stuck = conns
        with (
            watch.watching(late.subscriber, late.in_flight),
            watch.watching(stuck.subscriber, stuck.in_flight),
        ):
            for conn in conns:
                conn.write()
            # the sweep's ticks, by hand: each asks for the proofs that are due
            for _ in range(STALL_SAMPLES - 1):
                await trio.sleep(TICK_S)
                assert watch.sample(trio.current_time()) == []
                await trio.testing.wait_all_tasks_blocked()
            assert late.in_flight.proven == 0  # pinged, not answered
            await trio.sleep(TICK_S)
            # the late pong arrives at the tick, in the same instant
            os.write(late.client.fileno(), PONG)
            suspects = watch.sample(trio.current_time())
            assert suspects == [late.subscriber, stuck.subscriber]
            await watch.close_stalled(suspects)
            assert late.in_flight.proven > 0
            assert late.subscriber.close_code is None
            assert stuck.subscriber.close_code == 4008


async def test_a_pause_of_the_daemon_counts_against_no_client(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The daemon frozen for longer than the stall timeout (SIGSTOP, a frozen VM): no client
    could be pinged or read meanwhile, so none is closed for it (every healthy client of an
    edge was closed with 4008 after a 60 s SIGSTOP; review: soak2); one that stops
    answering after the pause still is."""
    watch = StallWatch(STALL_S)
    async with connections(True, True) as (nursery, conns):
        for conn in conns:
            nursery.start_soon(session, watch, conn)
        nursery.start_soon(writing, conns)
        await trio.sleep(3 * STALL_S)
        autojump_clock.jump(2.5 * STALL_S)  # nothing runs meanwhile: the whole process paused
        await trio.sleep(3 * STALL_S)
        assert [c.subscriber.close_code for c in conns] == [None, None]
        conns[0].answering = False
        await until_closed(conns[0])
        assert [c.subscriber.close_code for c in conns] == [4008, None]


# a stall timeout raised for clients on mobile links: the stall clocks are sampled every 60 s
LONG_STALL_S: Final = 600.0


async def blocked_send(conn: Connection, timeout_s: float, cut: list[float]) -> None:
    """A write of ``conn``'s publish task that never completes, in its send scope as
    ``publisher.Publisher`` runs it; when the scope was cancelled goes into ``cut``."""
    with conn.subscriber.send_scope:
        assert conn.in_flight.start_send(trio.current_time(), timeout_s)
        await trio.sleep_forever()
    cut.append(trio.current_time())


async def test_the_sweep_cuts_a_send_at_its_deadline_whatever_the_stall_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A send timeout of 1 s beside a stall timeout of 600 s: cut at 1 s, not at the next
    tick of the stall clocks 60 s on; a write that ends in time is not cut."""
    watch = StallWatch(LONG_STALL_S)
    async with connections(True) as (nursery, (conn,)):
        nursery.start_soon(session, watch, conn)
        await trio.testing.wait_all_tasks_blocked()
        assert conn.in_flight.start_send(trio.current_time(), 1.0)
        await trio.sleep(0.9)
        conn.in_flight.end_send()
        await trio.sleep(0.5)  # past that write's deadline
        assert not conn.subscriber.send_scope.cancel_called
        cut: list[float] = []
        started = trio.current_time()
        await blocked_send(conn, 1.0, cut)
        assert cut == [pytest.approx(started + 1.0)]


async def test_writes_ending_one_after_another_wake_the_sweep_at_most_every_slack(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A hundred connections' writes, begun 5 ms apart, each ending just in time: the sweep
    looks at the send deadlines at most every SEND_SLACK of the timeout, not at each one (a
    look at a deadline is a pass over every connection), and cuts none of them."""
    watch = StallWatch(LONG_STALL_S)
    timeout_s = 1.0
    count = 100
    with mock.patch.object(watch, "sample", wraps=watch.sample) as sample:
        async with loopback() as (server, _), trio.open_nursery() as nursery:
            conns = [
                (make_subscriber(), InFlight(server, trio.current_time())) for _ in range(count)
            ]
            for subscriber, in_flight in conns:
                nursery.start_soon(watch.watch, subscriber, in_flight)
            await trio.testing.wait_all_tasks_blocked()
            started = trio.current_time()

            async def write(i: int, subscriber: Subscriber, in_flight: InFlight) -> None:
                await trio.sleep_until(started + i * 0.005)
                with subscriber.send_scope:
                    assert in_flight.start_send(trio.current_time(), timeout_s)
                    await trio.sleep(0.99 * timeout_s)
                    in_flight.end_send()

            async with trio.open_nursery() as writers:
                for i, (subscriber, in_flight) in enumerate(conns):
                    writers.start_soon(write, i, subscriber, in_flight)
            assert not any(subscriber.send_scope.cancel_called for subscriber, _ in conns)
            nursery.cancel_scope.cancel()
    looks = [c for c in sample.call_args_list if not c.kwargs.get("full", True)]
    span_s = count * 0.005  # from the first deadline to the last
    assert 1 <= len(looks) <= span_s / (SEND_SLACK * timeout_s) + 2


async def test_a_pause_of_the_daemon_counts_against_no_send(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The daemon stops for 30 s while a write with a send timeout of 1 s is blocked (and
    the sweep sleeps until that write's deadline): not cut on resuming, though its deadline
    is long past by the clock; the sweep had not run since the write began, so it has its
    whole timeout again from there."""
    watch = StallWatch(LONG_STALL_S)
    cut: list[float] = []
    async with connections(True) as (nursery, (conn,)):
        nursery.start_soon(session, watch, conn)
        await trio.testing.wait_all_tasks_blocked()
        nursery.start_soon(blocked_send, conn, 1.0, cut)
        await trio.sleep(0.5)
        autojump_clock.jump(30.0)  # nothing runs meanwhile: the whole process paused
        resumed = trio.current_time()
        await trio.testing.wait_all_tasks_blocked()
        assert cut == []
        assert conn.subscriber.close_code is None
        await trio.sleep(2.0)
    assert cut == [pytest.approx(resumed + 1.0)]


async def test_a_send_skips_a_pause_from_when_the_sweep_last_ran(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A write with a send timeout of 5 s begins half a tick after the sweep ran; the sweep
    ticks every second; the daemon stops 3 s into the write, for 100 s. The write had 2 s
    left; it skips the pause and what went before it since the sweep last ran (0.5 s): cut
    2.5 s after the daemon resumes."""
    watch = StallWatch(10.0)
    cut: list[float] = []
    async with connections(True) as (nursery, (conn,)):
        nursery.start_soon(session, watch, conn)
        await trio.testing.wait_all_tasks_blocked()
        await trio.sleep(TICK_S / 2)
        nursery.start_soon(blocked_send, conn, 5.0, cut)
        await trio.sleep(3.0)
        autojump_clock.jump(100.0)  # nothing runs meanwhile: the whole process paused
        resumed = trio.current_time()
        await trio.sleep(2.0)
        assert cut == []
        await trio.sleep(1.0)
    assert cut == [pytest.approx(resumed + 2.5)]
