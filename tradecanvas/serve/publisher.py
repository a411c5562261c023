"""A subscriber's publish task (DESIGN §3, §6): the slow path of the Hub's fan-out.

The Hub (``tradecanvas.serve.hub``) writes what it publishes straight to an idle, caught-up
subscriber's socket when that takes it at once; everything else — catch-up, healing, the
event log, a subscriber whose socket would block or whose queue holds something — goes
through the subscriber's bounded queue, and this task carries out the queue's drain plan:
the store reads, then the messages, encoded once per publish and shared
(``tradecanvas.serve.encoded``), written as pre-framed bytes where the connection takes
them (the WS port) and as text messages elsewhere (the HTTP port).

Catch-ups at once: a store read and the messages made of it (a catch-up, a heal, events)
hold one of :data:`CATCHUPS_AT_ONCE` places, shared by every subscriber of the Hub, until
those messages are written: the memory of catch-ups waiting on sockets is bounded by about
that many catch-ups of ``catchup_limit`` candles. While another catch-up waits for a place,
each write of a place's holder must finish within :data:`CONTENDED_WRITE_S` (not
``send_timeout_s``), else that client is closed with 4008: clients that do not read cannot
keep the others waiting for long. Live candles written at once by the Hub take no place.

Deadlines: one cancel scope per task (``Subscriber.send_scope``), cancelled when a write in
progress — of at most :data:`WRITE_CHUNK_BYTES` — does not complete within
``send_timeout_s`` (a hurried holder's: :data:`CONTENDED_WRITE_S`): the subscriber is
closed with 4008. Where the endpoint's stall watch watches the connection, the write's
deadline is ``InFlight.send_deadline`` (:meth:`InFlight.start_send`) and the watch's sweep,
woken by it, cancels the scope (``stall_watch``: so a pause of the daemon counts against no
write, as it counts against no stall clock); elsewhere it is the scope's own deadline. The
queue's lag deadline is on ``Subscriber.lag_scope`` around it. Each drain settles the
delivery timing of the batches the subscriber owed when it began
(``ops.metrics.DeliveryTimer``).
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Final, Protocol, final

import trio

from tradecanvas.errors import StoreError, StoreUnreachable
from tradecanvas.model import Candle
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.encoded import Encoded, SharedEncodings
from tradecanvas.serve.outgoing import (
    Action,
    Answer,
    EventsRead,
    Gap,
    Outgoing,
    Plan,
    ReadEvents,
    ReadStore,
    StoredEventText,
)
from tradecanvas.serve.subscriber import Subscriber, TransportClosed
from tradecanvas.serve.ws_protocol import (
    CLIENT_GOODBYE_CODES,
    CLOSE_INTERNAL_ERROR,
    CLOSE_SLOW_CONSUMER,
)
from tradecanvas.store.types import StoredEvent
from tradecanvas.wire.json import dumps

log = logging.getLogger(__name__)

# pre-framed messages are written in pieces of about this size, each within send_timeout_s
# (a catch-up of thousands of messages is not one write that must finish in one timeout)
WRITE_CHUNK_BYTES: Final = 64 * 1024
# store reads (with the messages made of them) in progress at once, across the Hub's
# subscribers: without a bound, clients that subscribe with a long catch-up and never read
# each held a catch-up's candles and bytes (1.6 MB a session was measured); a place keeps
# only the bytes not yet written while they wait on the socket (see Publisher._pieces)
CATCHUPS_AT_ONCE: Final = 64
# while a catch-up waits for a place, a holder's write of at most WRITE_CHUNK_BYTES must
# finish within this (32 KiB/s): 64 clients that never read held every place for the whole
# send timeout, again and again, and every other client's catch-up waited behind them
CONTENDED_WRITE_S: Final = 2.0


class CandleReader(Protocol):
    """The reads the Hub makes (``CandleStore`` has them): ascending candles and events."""

    async def tail(self, series_id: str, limit: int) -> list[Candle]: ...

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]: ...

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = ...
    ) -> list[StoredEvent]: ...

    async def events_pruned_upto(self) -> int: ...

    async def events_newest_id(self) -> int: ...


class _SlowSend(Exception):
    """One write did not complete within send_timeout_s."""


def _chunks(encoded: Sequence[Encoded]) -> Iterator[bytes]:
    """The frames of ``encoded`` joined into writes of about WRITE_CHUNK_BYTES (whole frames)."""
    if len(encoded) == 1:
        yield encoded[0].frame
        return
    chunk: list[bytes] = []
    size = 0
    for e in encoded:
        frame = e.frame
        chunk.append(frame)
        size += len(frame)
        if size >= WRITE_CHUNK_BYTES:
            yield b"".join(chunk)
            chunk, size = [], 0
    if chunk:
        yield b"".join(chunk)


@final
class Publisher:
    """Runs subscribers' publish tasks (:meth:`run`) for one Hub: owns no task itself."""

    __slots__ = (
        "_holders",
        "_hurried",
        "catchups",
        "encodings",
        "metrics",
        "send_timeout_s",
        "store",
    )

    def __init__(
        self,
        store: CandleReader,
        encodings: SharedEncodings,
        *,
        send_timeout_s: float,
        metrics: Metrics,
        catchups_at_once: int = CATCHUPS_AT_ONCE,
    ) -> None:
        self.store = store
        self.encodings = encodings
        self.send_timeout_s = send_timeout_s
        self.metrics = metrics
        self.catchups = trio.CapacityLimiter(catchups_at_once)
        self._holders: dict[Subscriber, None] = {}  # the subscribers holding a place
        self._hurried: set[Subscriber] = set()  # holders on CONTENDED_WRITE_S

    async def run(self, subscriber: Subscriber) -> None:
        """The subscriber's publish task. Runs until its connection is cancelled; a delivery
        failure or a slow socket closes this subscriber only, never raises."""
        try:
            with subscriber.lag_scope:
                with subscriber.send_scope:
                    await self._publish_loop(subscriber)
                if subscriber.send_scope.cancelled_caught:
                    raise _SlowSend
            if subscriber.lag_scope.cancelled_caught:
                subscriber.close_for(subscriber.queue.lagged_out())
        except _SlowSend:
            subscriber.close(
                CLOSE_SLOW_CONSUMER,
                (
                    f"slow consumer: a catch-up write took longer than {CONTENDED_WRITE_S:g}s"
                    " while other catch-ups waited"
                    if subscriber in self._hurried
                    else f"slow consumer: a send took longer than {self.send_timeout_s:g}s"
                ),
                disconnect_reason="slow_consumer",
            )
        except TransportClosed as exc:
            if exc.code in CLIENT_GOODBYE_CODES:
                # the client said goodbye while we were sending: a normal end, not a
                # delivery failure (a strict publish must not fail because a chart closed)
                subscriber.mark_client_closed()
                subscriber.cancel_scope.cancel()
            elif not subscriber.closing:
                subscriber.fail(
                    f"delivery failed: {type(exc).__name__} {exc}".strip(),
                    disconnect_reason="send_failed",
                )
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            if not subscriber.closing:
                subscriber.fail(
                    f"delivery failed: {type(exc).__name__} {exc}".strip(),
                    disconnect_reason="send_failed",
                )
        except StoreError as exc:
            # the ingest side stops the daemon on a store failure; here only this one ends
            # (an outage the store's own lines report: a warning; the client comes back)
            level = logging.WARNING if isinstance(exc, StoreUnreachable) else logging.ERROR
            log.log(level, "subscriber %s: store read failed: %s", subscriber.peer, exc)
            subscriber.close(
                CLOSE_INTERNAL_ERROR, "store unavailable", disconnect_reason="internal_error"
            )
        except Exception:
            # a bug must not take the server (and every other subscriber) down with it
            log.exception("subscriber %s: publish task failed", subscriber.peer)
            subscriber.close(
                CLOSE_INTERNAL_ERROR, "internal error", disconnect_reason="internal_error"
            )
        finally:
            self._hurried.discard(subscriber)
            self.metrics.delivery.abandon(subscriber.take_owed())

    async def _publish_loop(self, subscriber: Subscriber) -> None:
        delivery = self.metrics.delivery
        while True:
            await subscriber.wait_ready()
            owed = subscriber.take_owed()
            try:
                frames = subscriber.frames
                if frames is not None and frames.needs_flush:
                    # a write at once left bytes behind: they go before anything else
                    self._start_write(subscriber)
                    await frames.flush()
                    self._end_write(subscriber)
                if frames is not None and subscriber.unsent:
                    # frames held at once that the socket did not take: before anything else
                    data, subscriber.unsent = subscriber.unsent, b""
                    self._start_write(subscriber)
                    await frames.write(data)
                    self._end_write(subscriber)
                await self._carry_out(subscriber, subscriber.queue.drain())
            except BaseException:
                delivery.abandon(owed)
                raise
            if owed:
                delivery.settle(owed, trio.current_time())

    def _start_write(self, subscriber: Subscriber) -> None:
        """The write that begins now must end within the send timeout, a hurried holder's
        within CONTENDED_WRITE_S (see the module docstring): by the stall watch's sweep
        where it watches the connection, else by the send scope's deadline."""
        timeout_s = self.send_timeout_s
        if subscriber in self._hurried:
            timeout_s = min(timeout_s, CONTENDED_WRITE_S)
        now = trio.current_time()
        in_flight = subscriber.in_flight
        if in_flight is not None and in_flight.start_send(now, timeout_s):
            subscriber.send_scope.deadline = math.inf
        else:
            subscriber.send_scope.deadline = now + timeout_s

    @staticmethod
    def _end_write(subscriber: Subscriber) -> None:
        """No write in progress: no send deadline."""
        subscriber.send_scope.deadline = math.inf
        if subscriber.in_flight is not None:
            subscriber.in_flight.end_send()

    def _hurry_holders(self) -> None:
        """A catch-up is about to wait for a place: every holder's write must finish within
        CONTENDED_WRITE_S from now on (the one in progress included)."""
        soon = trio.current_time() + CONTENDED_WRITE_S
        for holder in self._holders:
            self._hurried.add(holder)
            in_flight = holder.in_flight
            watched = in_flight is not None and in_flight.hurry_send(soon)
            scope = holder.send_scope
            # unwatched: the scope bounds what the holder does next, as before; watched, it
            # holds a deadline only for a write begun before the watch took the connection
            if not watched or scope.deadline != math.inf:
                scope.deadline = min(scope.deadline, soon)

    async def _carry_out(self, subscriber: Subscriber, plan: Plan) -> None:
        """Run a drain plan: answer its store reads, encode and send its messages (a read
        holds a place among :data:`CATCHUPS_AT_ONCE` until the next messages are written)."""
        answer: Answer = None
        holding = False
        try:
            while True:
                try:
                    action: Action | None = plan.send(answer)
                except StopIteration:
                    return
                answer = None  # a read's candles: in the plan's messages now, if anywhere
                if isinstance(action, ReadStore | ReadEvents) and not holding:
                    if self.catchups.available_tokens < 1:
                        self._hurry_holders()
                    await self.catchups.acquire()
                    holding = True
                    self._holders[subscriber] = None
                if isinstance(action, ReadStore):
                    answer = await self._read(action)
                elif isinstance(action, ReadEvents):
                    answer = await self._read_events(action)
                elif action is not None:
                    pieces = self._pieces(subscriber, action.messages)
                    action = None  # the messages and their candles: only the bytes are kept
                    await self._send(subscriber, pieces)
                    if holding:
                        self._give_back(subscriber)
                        holding = False
        finally:
            if holding:
                self._give_back(subscriber)
            plan.close()

    def _give_back(self, subscriber: Subscriber) -> None:
        del self._holders[subscriber]
        if not subscriber.send_scope.cancel_called:  # else run() names the reason first
            self._hurried.discard(subscriber)
        self.catchups.release()

    async def _read_events(self, read: ReadEvents) -> EventsRead:
        # the prune mark first: an event pruned after it was read is still in the read
        pruned_upto = await self.store.events_pruned_upto()
        stored = await self.store.events_after(read.after, [read.series_id], read.limit)
        newest = None if stored else await self.store.events_newest_id()
        return EventsRead(
            tuple(
                StoredEventText(s.event_id, dumps(SystemEvent.from_stored(s).to_wire()))
                for s in stored
            ),
            pruned_upto,
            newest,
        )

    async def _read(self, read: ReadStore) -> list[Candle]:
        if read.since is None:
            return await self.store.tail(read.series_id, read.limit)
        return await self.store.since(read.series_id, read.since, read.limit)

    def _encode(self, messages: Sequence[Outgoing]) -> list[Encoded]:
        """The wire messages of ``messages``, in order (counting the gaps as they go out)."""
        encoded: list[Encoded] = []
        for message in messages:
            if isinstance(message, Gap):
                self.metrics.gaps_total.inc()
            encoded.extend(self.encodings.encode(message))
        return encoded

    def _pieces(self, subscriber: Subscriber, messages: Sequence[Outgoing]) -> deque[bytes | str]:
        """What is written for ``messages``, in order: pre-framed writes of about
        WRITE_CHUNK_BYTES where the connection takes frames, else one text per message.
        Only these are kept while they go out (not the messages, candles or encodings)."""
        encoded = self._encode(messages)
        if subscriber.frames is not None:
            return deque(_chunks(encoded))
        return deque(e.text for e in encoded)

    async def _send(self, subscriber: Subscriber, pieces: deque[bytes | str]) -> None:
        """Write ``pieces`` in order, each within send_timeout_s (else the send scope is
        cancelled: 4008), letting go of each once written."""
        frames = subscriber.frames
        while pieces:
            piece = pieces.popleft()
            self._start_write(subscriber)
            if isinstance(piece, bytes):
                if frames is None:
                    raise TypeError("pre-framed bytes for a connection that takes text")
                await frames.write(piece)
            else:
                await subscriber.socket.send_message(piece)
            del piece
        self._end_write(subscriber)


__all__ = [
    "CATCHUPS_AT_ONCE",
    "CONTENDED_WRITE_S",
    "WRITE_CHUNK_BYTES",
    "CandleReader",
    "Publisher",
]
