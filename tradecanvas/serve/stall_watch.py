"""The stall clocks of one /ws/market endpoint's connections, sampled by one sweep (DESIGN §6).

A subscriber that stops reading is closed with 4008 once the oldest byte written to it has
gone unread for ``subscriber_stall_timeout_s`` (``tradecanvas.serve.in_flight``). That takes
a sample of each connection's :class:`~tradecanvas.serve.in_flight.InFlight` every
``stall_timeout_s / STALL_SAMPLES`` seconds, and a read-proof ping now and then. With a
sleeping task per connection for each, a thousand subscribers meant a thousand timers a
few seconds apart, and waking them was a quarter of the daemon's CPU in a burst
(docs/benchmarks.md, Burst). Here one sweep does it for every connection at each tick: it
samples each stall clock and asks the connection's read-proof task
(:meth:`InFlight.prove_reads`, which waits on an event, not a timer) for a ping when one is
due.

Who runs the sweep: the sessions themselves, one at a time. Each session's
:meth:`StallWatch.watch` task registers its connection, then queues for the sweep; the
oldest session runs it, and when that session ends the next one carries on at the next
tick. So the sweep lives exactly as long as there is a connection to watch, inside a
session's own task tree and cancel scope, and the waiting sessions cost no timer.

A pong that has already arrived must not make a healthy client look stalled. Under a
saturated loop a pong can sit in the socket's receive buffer for a while, and even once its
reader has taken it, the proof it completes is counted only when the read-proof task runs,
in the next scheduling pass. So a subscriber found over the timeout at a tick is checked
again :data:`SETTLE_PASSES` scheduling passes later — once every pong that had reached the
daemon by the tick has been read and counted — and closed only if it is still over: the
proof is older than the timeout as of a moment when the loop had just read everything
pending. That costs nothing at the ticks that find no one over it.

The sweep also enforces the publish task's send timeout of each connection it watches
(``InFlight.send_deadline``, set by ``publisher.Publisher`` for each write): at a tick past
it, the send scope is cancelled and the publish task closes the subscriber with 4008 — up
to a tick after the timeout. A trio deadline on the send scope would not do: trio's clock
runs on while the process is stopped, so on resuming such a deadline expired in the same
pass as the sweep's own timer, before the sweep could tell the pause, and every subscriber
whose write was blocked then was closed for the daemon's pause.

Time in which the daemon itself did not run (a tick found a quarter of the stall timeout
late or more) counts against no client: their stall clocks and send deadlines skip it
(:meth:`InFlight.skip`) before they are sampled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, final

import trio

from tradecanvas.serve.in_flight import PINGS_PER_STALL, InFlight
from tradecanvas.serve.subscriber import Subscriber
from tradecanvas.serve.subscriber_queue import SLOW_CONSUMER
from tradecanvas.serve.ws_protocol import CLOSE_SLOW_CONSUMER

log = logging.getLogger(__name__)

# samples of each connection's stall clock per stall timeout: the tick of the sweep
STALL_SAMPLES: Final = 10
# scheduling passes between finding a subscriber over the stall timeout and closing it: in
# the first, the readers of sockets with input pending take it (a pong sets its ping's
# event); in the second the read-proof tasks so woken count their proofs; the third runs
# the check after them whatever the order of the tasks within a pass
SETTLE_PASSES: Final = 3
# a tick this late (a share of the stall timeout) means the daemon did not run: no loop
# under load is that late, and a shorter pause cannot close a client that answers
PAUSE_FRACTION: Final = 0.25


@final
class StallWatch:
    """The stall clocks of one endpoint's connections and the sweep that samples them (see
    the module docstring). Owns no task: each session runs :meth:`watch` for its
    connection, and one of those tasks at a time runs the sweep. Raises nothing but
    cancellation."""

    def __init__(self, stall_timeout_s: float) -> None:
        if stall_timeout_s <= 0:
            raise ValueError("stall_timeout_s must be > 0")
        self.stall_timeout_s = stall_timeout_s
        self.tick_s = stall_timeout_s / STALL_SAMPLES
        self._ping_every_s = stall_timeout_s / PINGS_PER_STALL
        # insertion-ordered: the oldest connection first
        self._watched: dict[Subscriber, InFlight] = {}
        # held by the session running the sweep; the others queue for it, oldest first
        self._turn = trio.Lock()
        self._next_tick: float | None = None

    @property
    def watched(self) -> int:
        return len(self._watched)

    async def watch(self, subscriber: Subscriber, in_flight: InFlight) -> None:
        """Watch ``subscriber``'s connection until cancelled (its session's end), closing it
        with 4008 if it stalls; run the sweep while it is this session's turn."""
        with self.watching(subscriber, in_flight):
            async with self._turn:
                await self._sweep()

    @contextmanager
    def watching(self, subscriber: Subscriber, in_flight: InFlight) -> Iterator[None]:
        """``subscriber``'s connection is among those the sweep samples, within."""
        self._watched[subscriber] = in_flight
        in_flight.sends_watched = True
        try:
            yield
        finally:
            del self._watched[subscriber]
            in_flight.sends_watched = False
            # a write in progress keeps its deadline, on the send scope from here on
            scope = subscriber.send_scope
            scope.deadline = min(scope.deadline, in_flight.send_deadline)
            if not self._watched:
                self._next_tick = None  # the next connection starts a schedule of its own

    async def _sweep(self) -> None:
        while True:
            if self._next_tick is None:
                self._next_tick = trio.current_time() + self.tick_s
            due = self._next_tick
            await trio.sleep_until(due)
            now = trio.current_time()
            # from when this sample was taken: a loop running late does not bunch them up
            self._next_tick = now + self.tick_s
            if now - due > self.stall_timeout_s * PAUSE_FRACTION:
                self._skip(now - due)
            suspects = self.sample(now)
            if suspects:
                await self.close_stalled(suspects)

    def _skip(self, gap_s: float) -> None:
        """A tick late by PAUSE_FRACTION of the stall timeout or more: the daemon did not run
        for ``gap_s`` (a SIGSTOP, a frozen VM or container, a loop starved): no client could
        be pinged or its answer read then, so that time counts against none of them (else
        every healthy client was closed as stalled after a pause of the daemon longer than
        two thirds of the timeout)."""
        log.warning(
            "the daemon did not run for %.1f s (paused, or its event loop was blocked): the"
            " clients' stall clocks skip that time",
            gap_s,
        )
        for in_flight in self._watched.values():
            in_flight.skip(gap_s)

    def sample(self, now: float) -> list[Subscriber]:
        """One tick of the sweep at ``now``: cancel the send scope of a write past its
        deadline (the publish task closes that subscriber with 4008) and ask for the read
        proofs that are due; the subscribers over the stall timeout by this sample (for
        :meth:`close_stalled`)."""
        suspects: list[Subscriber] = []
        for subscriber, in_flight in self._watched.items():
            if subscriber.close_code is not None or subscriber.failure is not None:
                continue  # ending already
            if now >= in_flight.send_deadline:
                subscriber.send_scope.cancel()
                continue
            in_flight.want_proof(now, self._ping_every_s)
            if in_flight.behind(now) >= self.stall_timeout_s:
                suspects.append(subscriber)
        return suspects

    async def close_stalled(self, suspects: list[Subscriber]) -> None:
        """Close with 4008 those of ``suspects`` still over the stall timeout once the loop
        has read what was pending when they were sampled (see the module docstring)."""
        for _ in range(SETTLE_PASSES):
            await trio.lowlevel.checkpoint()
        now = trio.current_time()
        for subscriber in suspects:
            in_flight = self._watched.get(subscriber)
            if in_flight is None or subscriber.close_code is not None:
                continue  # gone or closing meanwhile
            if in_flight.behind(now) >= self.stall_timeout_s:
                subscriber.close(
                    CLOSE_SLOW_CONSUMER,
                    f"slow consumer: nothing read for {self.stall_timeout_s:g}s",
                    disconnect_reason=SLOW_CONSUMER,
                    cause="stalled",
                )


__all__ = ["SETTLE_PASSES", "STALL_SAMPLES", "StallWatch"]
