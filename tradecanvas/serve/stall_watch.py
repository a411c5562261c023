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
(``InFlight.send_deadline``, set by ``publisher.Publisher`` for each write): past it, the
send scope is cancelled and the publish task closes the subscriber with 4008. A trio
deadline on the send scope would not do: trio's clock runs on while the process is stopped,
so on resuming such a deadline expired in the same pass as the sweep's own timer, before
the sweep could tell the pause, and every subscriber whose write was blocked then was closed
for the daemon's pause. Nor would the ticks alone: they come a tenth of the stall timeout
apart (a minute with a stall timeout raised to 600 s), so a 1 s send timeout was enforced a
minute late. So a write that begins brings the sweep's next wake-up forward to its deadline
when that is sooner (:meth:`StallWatch.wake_by`: a comparison, and now and then a new
deadline for the sweep's one sleep — still no timer per connection), and a wake-up that is
not a tick only looks at the send deadlines. After a wake-up the sweep sleeps until the
next tick or the earliest deadline of the writes still in progress, whichever is sooner,
but at least :data:`SEND_SLACK` of that write's timeout: a write is cut within that share
of its timeout, whatever the stall timeout, and a thousand writes in progress wake the
sweep at most that often.

Time in which the daemon itself did not run counts against no client. A wake-up found late
by a quarter of the stall timeout or more means the daemon did not run: the stall clocks
skip that lateness (:meth:`InFlight.skip`) before they are sampled. The writes in progress
skip the pause then too, and so does a write whose wake-up is late by a quarter of its own
timeout (:meth:`InFlight.skip_send`). A write skips more than the lateness: all the time
since the sweep last ran, or since the write began if that is later — the last moment the
daemon is known to have run. The sweep often sleeps until that very write's deadline, and
skipping only the time after the deadline would still cut the write on resuming. So a write
that spans a pause gets at most its whole timeout again after it. A pause that ends before
the sweep's next wake-up is not seen (as before: a tick of the stall clocks, or a send
deadline, must fall within it).
"""

from __future__ import annotations

import logging
import math
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
# under load is that late, and a shorter pause cannot close a client that answers; a
# wake-up this late as a share of a write's timeout means the same for that write
PAUSE_FRACTION: Final = 0.25
# a write is cut this share of its timeout after its deadline at most: the sweep wakes up
# for the send deadlines no more often (a thousand writes in progress, ending at
# different times, do not wake it a thousand times)
SEND_SLACK: Final = 0.1


@final
class StallWatch:
    """The stall clocks of one endpoint's connections and the sweep that samples them (see
    the module docstring). Owns no task: each session runs :meth:`watch` for its
    connection, and one of those tasks at a time runs the sweep. Raises nothing but
    cancellation. The connections' :class:`InFlight` call :meth:`wake_by` for the
    deadlines of their writes (:class:`~tradecanvas.serve.in_flight.SendWatch`)."""

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
        # the next wake-up for the send deadlines (inf: none due)
        self._next_send = math.inf
        # the sweep's sleep while it sleeps (wake_by brings its end forward)
        self._sleep: trio.CancelScope | None = None
        # when the sweep last ran: the daemon ran then
        self._ran_at: float | None = None

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
        in_flight.send_watch = self
        try:
            yield
        finally:
            del self._watched[subscriber]
            in_flight.send_watch = None
            # a write in progress keeps its deadline, on the send scope from here on
            scope = subscriber.send_scope
            scope.deadline = min(scope.deadline, in_flight.send_deadline)
            if not self._watched:
                # the next connection starts a schedule of its own
                self._next_tick = None
                self._next_send = math.inf
                self._ran_at = None

    def wake_by(self, deadline: float) -> None:
        """Have the sweep look at the send deadlines by ``deadline`` (a write's, as it
        begins: O(1), and the sweep's sleep gets a new deadline only when it is the
        earliest)."""
        if deadline < self._next_send:
            self._next_send = deadline
            sleep = self._sleep
            if sleep is not None and deadline < sleep.deadline:
                sleep.deadline = deadline

    async def _sweep(self) -> None:
        while True:
            now = trio.current_time()
            if self._next_tick is None:
                self._next_tick = now + self.tick_s
            if self._ran_at is None:
                self._ran_at = now
            # like trio.sleep_until, with a deadline that wake_by may bring forward
            with trio.CancelScope(deadline=min(self._next_tick, self._next_send)) as sleep:
                self._sleep = sleep
                try:
                    await trio.sleep_forever()
                finally:
                    self._sleep = None
            now = trio.current_time()
            late_s = now - sleep.deadline
            ran_at, self._ran_at = self._ran_at, now
            paused = late_s > self.stall_timeout_s * PAUSE_FRACTION
            if paused:
                self._skip(late_s)
            tick = now >= self._next_tick
            if tick:
                # from when this sample was taken: a loop running late does not bunch them up
                self._next_tick = now + self.tick_s
            suspects = self.sample(now, late_s=late_s, ran_at=ran_at, paused=paused, full=tick)
            if suspects:
                await self.close_stalled(suspects)

    def _skip(self, gap_s: float) -> None:
        """A wake-up late by PAUSE_FRACTION of the stall timeout or more: the daemon did not
        run for ``gap_s`` (a SIGSTOP, a frozen VM or container, a loop starved): no client
        could be pinged or its answer read then, so that time counts against none of their
        stall clocks (else every healthy client was closed as stalled after a pause of the
        daemon longer than two thirds of the timeout). The writes in progress skip it in
        :meth:`sample`."""
        log.warning(
            "the daemon did not run for %.1f s (paused, or its event loop was blocked): the"
            " clients' stall clocks and sends skip that time",
            gap_s,
        )
        for in_flight in self._watched.values():
            in_flight.skip(gap_s)

    def sample(
        self,
        now: float,
        *,
        late_s: float = 0.0,
        ran_at: float | None = None,
        paused: bool = False,
        full: bool = True,
    ) -> list[Subscriber]:
        """One wake-up of the sweep at ``now``, ``late_s`` after it was due (``paused``: late
        enough for the stall clocks to skip it), having last run at ``ran_at``: shift the
        deadline of a write in progress past a pause (see the module docstring), cancel the
        send scope of a write past its deadline (the publish task closes that subscriber
        with 4008), and note when the sweep must wake up next for the send deadlines. At a
        tick (``full``), also ask for the read proofs that are due and sample the stall
        clocks: the subscribers over the stall timeout by this sample (for
        :meth:`close_stalled`)."""
        suspects: list[Subscriber] = []
        next_send = math.inf
        for subscriber, in_flight in self._watched.items():
            if subscriber.close_code is not None or subscriber.failure is not None:
                continue  # ending already
            deadline = in_flight.send_deadline
            if deadline != math.inf:
                started = in_flight.send_started
                timeout_s = deadline - started
                if ran_at is not None and (paused or late_s > timeout_s * PAUSE_FRACTION):
                    in_flight.skip_send(now - max(ran_at, started))
                    deadline = in_flight.send_deadline
                if now >= deadline:
                    subscriber.send_scope.cancel()
                    continue
                next_send = min(next_send, max(deadline, now + timeout_s * SEND_SLACK))
            if full:
                in_flight.want_proof(now, self._ping_every_s)
                if in_flight.behind(now) >= self.stall_timeout_s:
                    suspects.append(subscriber)
        self._next_send = next_send
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


__all__ = ["SEND_SLACK", "SETTLE_PASSES", "STALL_SAMPLES", "StallWatch"]
