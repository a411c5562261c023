"""The in-flight budget and the stall clock (DESIGN §6): :class:`StallClock` without I/O, and
:class:`InFlight` on a real loopback connection whose client stops reading. The session's
use of them — 4008 within the stall timeout, the close frame delivered — is tested with real
clients in tests/serve/test_slow_consumers.py."""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from tradecanvas.serve.in_flight import (
    IN_FLIGHT_MAX_BYTES,
    PING_FRAME_BYTES,
    PINGS_PER_STALL,
    SEND_BUFFER_BYTES,
    InFlight,
    StallClock,
    acknowledged_bytes,
    limit_send_buffer,
    unacknowledged_bytes,
)


def test_nothing_unacknowledged_is_never_behind() -> None:
    clock = StallClock(0.0)
    assert clock.observe(1.0, acked=0, unacked=0) == 0.0
    assert clock.observe(2.0, acked=500, unacked=0) == 0.0


def test_behind_is_the_age_of_the_oldest_unacknowledged_byte_from_above() -> None:
    clock = StallClock(0.0)
    assert clock.observe(1.0, acked=0, unacked=0) == 0.0
    # bytes first seen at 2.0 were written after the sample at 1.0: as old as 1.0 at most
    assert clock.observe(2.0, acked=0, unacked=100) == 1.0
    assert clock.observe(3.0, acked=0, unacked=300) == 2.0
    # the first 100 are acknowledged: the oldest left were written after 2.0
    assert clock.observe(4.0, acked=150, unacked=150) == 2.0
    assert clock.observe(5.0, acked=300, unacked=0) == 0.0
    # a new stall starts from the sample before it, not from the old one
    assert clock.observe(6.0, acked=300, unacked=10) == 1.0


def test_a_slow_reader_that_keeps_acknowledging_stays_a_little_behind() -> None:
    clock = StallClock(0.0)
    acked = 0
    for second in range(1, 100):
        # 1,000 bytes written a second, the reader a second behind
        written = 1000 * second
        behind = clock.observe(float(second), acked=acked, unacked=written - acked)
        assert behind <= 2.0
        acked = written - 1000


def test_a_stuck_reader_falls_behind_by_the_clock() -> None:
    clock = StallClock(0.0)
    behind = [clock.observe(float(t), acked=4096, unacked=1000 + t) for t in range(1, 40)]
    assert behind == [float(t) for t in range(1, 40)]


@asynccontextmanager
async def loopback(
    receive_buffer: int = 4096,
) -> AsyncIterator[tuple[trio.socket.SocketType, trio.socket.SocketType]]:
    """(server side, client side) of a real loopback TCP connection; the client's receive
    buffer is small so that a client that does not read fills up soon."""
    listener = trio.socket.socket()
    client = trio.socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await listener.bind(("127.0.0.1", 0))
    listener.listen()
    await client.connect(listener.getsockname())
    server, _ = await listener.accept()
    try:
        yield server, client
    finally:
        server.close()
        client.close()
        listener.close()


async def fill(server: trio.socket.SocketType, in_flight: InFlight, size: int) -> int:
    """Write ``size``-byte pieces while the budget lets them go; the bytes written."""
    written = 0
    while in_flight.fits(size):
        n = await server.send(b"x" * size)
        in_flight.note_written(n)
        written += n
        assert n == size, "the send buffer ran out before the budget did"
    return written


async def test_the_budget_stops_writes_well_before_the_send_buffer_is_full() -> None:
    async with loopback() as (server, client):
        limit_send_buffer(server)
        assert server.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= SEND_BUFFER_BYTES
        in_flight = InFlight(server, trio.current_time())
        written = await fill(server, in_flight, 1000)
        unacked = unacknowledged_bytes(server)
        assert unacked is not None
        assert IN_FLIGHT_MAX_BYTES - 1000 < unacked <= IN_FLIGHT_MAX_BYTES
        # the close frame still fits: the kernel takes more at once
        assert await server.send(b"c" * 200) == 200
        # the client reads everything: the budget is free again, all of it (waiting for room
        # for a mere 1,000 bytes could end before the client's delayed ACK of the rest)
        received = 0
        while received < unacked + 200:
            received += len(await client.recv(1 << 20))
        with trio.fail_after(5):
            await in_flight.wait_room(IN_FLIGHT_MAX_BYTES)
        assert acknowledged_bytes(server) == written + 200


async def test_a_write_bigger_than_the_budget_goes_alone_with_room_for_it() -> None:
    big = 3 * IN_FLIGHT_MAX_BYTES
    async with loopback() as (server, client):
        limit_send_buffer(server)
        in_flight = InFlight(server, trio.current_time())
        assert in_flight.fits(big)  # nothing in flight: it goes, the buffer raised for it
        assert await server.send(b"x" * big) == big
        in_flight.note_written(big)
        assert not in_flight.fits(1)  # nothing more until it is acknowledged
        received = 0
        while received < big:
            received += len(await client.recv(1 << 20))
        with trio.fail_after(5):
            await in_flight.wait_room(1)


async def test_behind_counts_from_when_the_client_stopped_acknowledging(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with loopback() as (server, client):
        limit_send_buffer(server)
        in_flight = InFlight(server, trio.current_time())
        assert in_flight.behind(trio.current_time()) == 0.0
        await fill(server, in_flight, 1000)  # the client reads nothing
        start = trio.current_time()
        for _ in range(5):
            await trio.sleep(1)
            behind = in_flight.behind(trio.current_time())
        assert behind == pytest.approx(trio.current_time() - start, abs=1.0)
        assert in_flight.in_flight == unacknowledged_bytes(server)
        while unacknowledged_bytes(server):
            await client.recv(1 << 20)
        assert in_flight.behind(trio.current_time()) == 0.0


async def test_read_proofs_count_what_was_written_before_each_answered_ping(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """prove_reads with a client that answers its first ping and then none: a ping goes out
    only when want_proof asks and one is due (something unproven, none waiting for its pong,
    the last asked for long enough ago); what came before the answered ping (and the ping)
    is read; the clock then counts from the first byte written after the proof."""
    stall_s = 10.0
    every_s = stall_s / PINGS_PER_STALL
    answers = [True]  # the client answers once, then stops reading
    pings: list[bytes] = []
    async with loopback(4 * 1024 * 1024) as (server, _client):
        in_flight = InFlight(server, trio.current_time())

        async def ping(payload: bytes) -> None:
            pings.append(payload)
            in_flight.note_written(PING_FRAME_BYTES)
            if not (answers.pop(0) if answers else False):
                await trio.sleep_forever()

        async def ask() -> None:
            in_flight.want_proof(trio.current_time(), every_s)
            await trio.testing.wait_all_tasks_blocked()

        async with trio.open_nursery() as nursery:
            prove = functools.partial(in_flight.prove_reads, ping_bytes=PING_FRAME_BYTES)
            nursery.start_soon(prove, ping)
            await trio.testing.wait_all_tasks_blocked()
            in_flight.note_written(100)
            await ask()
            assert pings == []  # asked too soon after the connection began
            await trio.sleep(every_s)
            await ask()
            assert len(pings) == 1
            assert in_flight.proven == in_flight.written == 100 + PING_FRAME_BYTES
            assert in_flight.behind(trio.current_time()) == 0.0
            await trio.sleep(3 * every_s)
            await ask()
            assert len(pings) == 1  # nothing new: no ping
            stopped = trio.current_time()
            in_flight.note_written(50)  # never read
            await ask()
            assert len(pings) == 2  # one ping for it at once (the last is long past)
            for _ in range(3):
                await trio.sleep(every_s)
                await ask()
            assert len(pings) == 2  # and no other while it waits for its pong
            assert in_flight.proven == 100 + PING_FRAME_BYTES
            behind = in_flight.behind(trio.current_time())
            assert trio.current_time() - stopped <= behind
            nursery.cancel_scope.cancel()


class Wakes:
    """A stall watch's side of the send deadlines: the wake-ups asked for."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    def wake_by(self, deadline: float) -> None:
        self.asked.append(deadline)


async def test_a_watched_write_wakes_the_watch_by_its_deadline_and_skips_a_pause() -> None:
    """Unwatched, a write's deadline is the caller's (start_send says so); watched, each
    write asks the watch to wake by its deadline, a hurry only brings a deadline forward,
    and a pause moves the write's start and deadline on alike (its timeout unchanged)."""
    async with loopback() as (server, _):
        in_flight = InFlight(server, 0.0)
        assert not in_flight.start_send(1.0, 10.0)
        assert not in_flight.hurry_send(2.0)
        assert in_flight.send_deadline == float("inf")
        wakes = Wakes()
        in_flight.send_watch = wakes
        assert in_flight.hurry_send(2.0)  # no write in progress: nothing to hurry
        assert in_flight.start_send(1.0, 10.0)
        assert (in_flight.send_started, in_flight.send_deadline) == (1.0, 11.0)
        assert in_flight.hurry_send(12.0)  # later than the deadline: unchanged
        assert in_flight.hurry_send(3.0)
        assert in_flight.send_deadline == 3.0
        in_flight.skip_send(100.0)
        assert (in_flight.send_started, in_flight.send_deadline) == (101.0, 103.0)
        in_flight.end_send()
        assert in_flight.send_deadline == float("inf")
        assert wakes.asked == [11.0, 3.0]
