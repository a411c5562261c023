"""The two delivery paths of the Hub: written at once from the publish call (idle, caught-up
subscribers whose socket takes it) and queued for the subscriber's publish task
(``serve/publisher.py``) — the same messages, in the same order, exactly once; no store read
while a subscriber is caught up; the delivery timing and the queue high-water mark."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import Any, Final, final

import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import flat_minutes
from tests.serve.test_hub import T0, FakeSocket, MemoryReader, connected, make_hub
from tests.serve.test_in_flight import loopback
from tests.serve.test_ws_server import SERIES_1M, SID_1M
from tradecanvas.model import Candle
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.high_water import WINDOW_S
from tradecanvas.serve.hub import CandleReader, Hub
from tradecanvas.serve.in_flight import InFlight
from tradecanvas.serve.publisher import CONTENDED_WRITE_S, WRITE_CHUNK_BYTES
from tradecanvas.serve.stall_watch import StallWatch
from tradecanvas.serve.subscriber import Subscriber
from tradecanvas.wire.json import loads


def parse_frames(data: bytes) -> list[dict[str, Any]]:
    """The messages in a run of unmasked server text frames (raises on a torn one)."""
    messages = []
    i = 0
    while i < len(data):
        assert data[i] == 0x81, f"not a final text frame at {i}"
        n = data[i + 1]
        i += 2
        if n == 126:
            n, i = int.from_bytes(data[i : i + 2], "big"), i + 2
        elif n == 127:
            n, i = int.from_bytes(data[i : i + 8], "big"), i + 8
        assert i + n <= len(data), "torn frame"
        messages.append(loads(data[i : i + n]))
        i += n
    return messages


class FakeFrames:
    """A FrameWriter that records the bytes written. ``block``: ``write_nowait`` takes
    nothing; ``take``: it takes at most that many bytes (the rest waits for ``flush``)."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.block = False
        self.take: int | None = None
        self.at_once = 0
        self.awaited = 0
        self.writes: list[int] = []
        self._unsent = b""

    @property
    def needs_flush(self) -> bool:
        return bool(self._unsent)

    def write_nowait(self, frames: bytes) -> bool:
        if self.block or self._unsent:
            raise trio.WouldBlock
        n = len(frames) if self.take is None else min(self.take, len(frames))
        if n == 0:
            raise trio.WouldBlock
        self.data += frames[:n]
        self._unsent = frames[n:]
        self.at_once += 1
        return not self._unsent

    async def write(self, frames: bytes) -> None:
        await trio.lowlevel.checkpoint()
        self.data += self._unsent + frames
        self._unsent = b""
        self.awaited += 1
        self.writes.append(len(frames))

    async def flush(self) -> None:
        await trio.lowlevel.checkpoint()
        self.data += self._unsent
        self._unsent = b""

    def messages(self) -> list[dict[str, Any]]:
        return parse_frames(bytes(self.data))


@final
class CountingReader:
    """MemoryReader that counts the store reads."""

    def __init__(self, candles: Sequence[Candle]) -> None:
        self.inner = MemoryReader(candles)
        self.reads = 0

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        self.reads += 1
        return await self.inner.tail(series_id, limit)

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        self.reads += 1
        return await self.inner.since(series_id, since, limit)

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = 1000
    ) -> list[Any]:
        return await self.inner.events_after(after, series_ids, limit)

    async def events_pruned_upto(self) -> int:
        return await self.inner.events_pruned_upto()

    async def events_newest_id(self) -> int:
        return await self.inner.events_newest_id()


@asynccontextmanager
async def framed(hub: Hub, frames: FakeFrames) -> AsyncIterator[Subscriber]:
    """A connection with a FrameWriter and its publish task, as the WS port runs it."""
    async with connected(hub, FakeSocket(), frames) as subscriber:
        await trio.testing.wait_all_tasks_blocked()
        yield subscriber


def closed_times(messages: list[dict[str, Any]]) -> list[int]:
    out: list[int] = []
    for m in messages:
        if m["type"] == "candle_closed":
            out.append(m["candle"]["candle_time"])
        elif m["type"] == "candles_batch":
            out.extend(c["candle_time"] for c in m["candles"])
    return out


HISTORY: Final = list(flat_minutes(T0, 3))
LIVE: Final = list(flat_minutes(T0 + 3 * 60, 20))


@asynccontextmanager
async def caught_up(
    reader: CandleReader | None = None, *, batch: bool = False, **hub: Any
) -> AsyncIterator[tuple[Hub, FakeFrames, Subscriber]]:
    """A hub (``make_hub`` with ``hub``'s settings) over ``reader`` (HISTORY by default) and
    one framed connection subscribed to SERIES_1M from HISTORY's last minute, its publish
    task parked: idle and caught up, so a live close may go at once."""
    made = make_hub(reader if reader is not None else MemoryReader(HISTORY), **hub)
    frames = FakeFrames()
    async with framed(made, frames) as subscriber:
        made.subscribe(subscriber, SERIES_1M, HISTORY[-1].candle_time, batch=batch)
        await trio.testing.wait_all_tasks_blocked()
        yield made, frames, subscriber


async def test_a_caught_up_idle_subscriber_gets_a_close_at_once_and_reads_no_store() -> None:
    reader = CountingReader(HISTORY)
    hub = make_hub(reader)
    frames = FakeFrames()
    async with framed(hub, frames) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=False)
        await trio.testing.wait_all_tasks_blocked()
        assert closed_times(frames.messages()) == [c.candle_time for c in HISTORY]
        reads, awaited = reader.reads, frames.awaited
        assert subscriber.idle
        for candle in LIVE[:5]:
            hub.publish_closed(SID_1M, [candle])
            # written before this task yielded: at once, by the publish call itself
            assert closed_times(frames.messages())[-1] == candle.candle_time
        await trio.testing.wait_all_tasks_blocked()
        assert (reader.reads, frames.awaited) == (reads, awaited)
        assert frames.messages()[-1] == {
            "type": "candle_closed",
            "series_id": SID_1M,
            "candle": LIVE[4].to_wire(),
        }
        assert isinstance(subscriber.socket, FakeSocket) and subscriber.socket.sent == []


async def test_a_blocked_socket_queues_and_later_closes_wait_behind_the_queue() -> None:
    async with caught_up(batch=True) as (hub, frames, subscriber):
        frames.block = True
        hub.publish_closed(SID_1M, LIVE[:1])  # queued: the socket takes nothing now
        frames.block = False
        assert not subscriber.idle
        hub.publish_closed(SID_1M, LIVE[1:2])  # queued too: behind the first
        assert frames.messages() == []
        await trio.testing.wait_all_tasks_blocked()
        # the publish task sent both, coalesced, in one write; then at once again
        assert frames.messages() == [
            {
                "type": "candles_batch",
                "series_id": SID_1M,
                "candles": [c.to_wire() for c in LIVE[:2]],
            }
        ]
        assert (frames.awaited, subscriber.idle) == (1, True)
        hub.publish_closed(SID_1M, LIVE[2:3])
        assert closed_times(frames.messages()) == [c.candle_time for c in LIVE[:3]]


async def test_a_partial_write_is_finished_by_the_publish_task_before_anything_else() -> None:
    async with caught_up() as (hub, frames, _):
        frames.take = 10
        hub.publish_closed(SID_1M, LIVE[:2])  # 10 bytes out, the rest committed
        frames.take = None
        hub.publish_closed(SID_1M, LIVE[2:3])  # queued: the rest must go first
        hub.publish_forming(SID_1M, LIVE[3])
        await trio.testing.wait_all_tasks_blocked()
        messages = frames.messages()
        assert closed_times(messages) == [c.candle_time for c in LIVE[:3]]
        assert messages[-1]["type"] == "candle_forming"


async def test_forming_goes_at_once_only_above_the_cursor_and_after_queued_closes() -> None:
    async with caught_up() as (hub, frames, _):
        hub.publish_forming(SID_1M, LIVE[0])
        assert frames.messages()[-1]["type"] == "candle_forming"
        hub.publish_forming(SID_1M, HISTORY[-1])  # at the cursor: never sent
        frames.block = True
        hub.publish_closed(SID_1M, LIVE[:1])
        frames.block = False
        hub.publish_forming(SID_1M, LIVE[1])  # queued behind the close
        assert [m["type"] for m in frames.messages()] == ["candle_forming"]
        await trio.testing.wait_all_tasks_blocked()
        kinds = [(m["type"], m["candle"]["candle_time"]) for m in frames.messages()]
        assert kinds == [
            ("candle_forming", LIVE[0].candle_time),
            ("candle_closed", LIVE[0].candle_time),
            ("candle_forming", LIVE[1].candle_time),
        ]


async def test_a_hole_is_never_written_at_once_it_heals_from_the_store() -> None:
    reader = CountingReader(HISTORY)
    async with caught_up(reader) as (hub, frames, _):
        assert frames.messages() == []
        reader.inner.candles[SID_1M].extend(LIVE[:3])  # committed
        reads = reader.reads
        hub.publish_closed(SID_1M, LIVE[2:3])  # LIVE[0:2] were never published here
        assert frames.messages() == []
        await trio.testing.wait_all_tasks_blocked()
        assert closed_times(frames.messages()) == [c.candle_time for c in LIVE[:3]]
        assert reader.reads > reads


async def test_corked_publishes_reach_a_subscriber_in_one_write_at_the_end() -> None:
    async with caught_up() as (hub, frames, subscriber):
        with hub.corked():
            for candle in LIVE[:3]:
                hub.publish_closed(SID_1M, [candle])
            assert frames.messages() == []  # held until the block ends
        assert frames.at_once == 1
        assert closed_times(frames.messages()) == [c.candle_time for c in LIVE[:3]]
        # the socket takes nothing when the block ends: the held frames are the publish
        # task's to write, before what is queued after them
        frames.block = True
        with hub.corked():
            hub.publish_closed(SID_1M, LIVE[3:4])
        frames.block = False
        assert not subscriber.idle
        hub.publish_closed(SID_1M, LIVE[4:5])
        assert closed_times(frames.messages()) == [c.candle_time for c in LIVE[:3]]
        await trio.testing.wait_all_tasks_blocked()
        assert closed_times(frames.messages()) == [c.candle_time for c in LIVE[:5]]
        assert (subscriber.unsent, subscriber.close_code) == (b"", None)


OPS = st.sampled_from(
    ["close", "close2", "forming", "event", "block", "unblock", "take", "settle", "cork"]
)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(OPS, max_size=40), batch=st.booleans())
def test_both_paths_together_deliver_every_close_once_in_order(ops: list[str], batch: bool) -> None:
    """Whatever the socket does between publishes, corked or not, a subscriber gets every
    closed candle once, in order, each forming candle above the closes before it, each event
    once. (``cork`` opens a ``Hub.corked`` block, the next ``settle`` or the end closes it:
    the ingest's never spans an await.)"""
    candles = list(flat_minutes(T0 + 3 * 60, 100))

    async def run() -> list[dict[str, Any]]:
        reader = MemoryReader(HISTORY)
        next_index = 0
        event_id = 0
        cork = contextlib.ExitStack()
        async with caught_up(reader, batch=batch, queue_max=8) as (hub, frames, subscriber):
            for op in ops:
                if op in ("close", "close2"):
                    n = 1 if op == "close" else 2
                    group = candles[next_index : next_index + n]
                    next_index += n
                    reader.candles[SID_1M].extend(group)  # committed before published
                    hub.publish_closed(SID_1M, group)
                elif op == "forming":
                    hub.publish_forming(SID_1M, candles[next_index])
                elif op == "event":
                    event_id += 1
                    hub.publish_system(
                        SystemEvent(SID_1M, "revised", event_id, event_id, event_id=event_id)
                    )
                elif op == "block":
                    frames.block = True
                elif op == "unblock":
                    frames.block, frames.take = False, None
                elif op == "take":
                    frames.take = 7
                elif op == "cork":
                    cork.enter_context(hub.corked())
                else:
                    cork.close()
                    await trio.testing.wait_all_tasks_blocked()
            cork.close()
            frames.block, frames.take = False, None
            subscriber.wake()
            await trio.testing.wait_all_tasks_blocked()
            assert subscriber.close_code is None
        expected = [c.candle_time for c in candles[:next_index]]
        messages = frames.messages()
        assert closed_times(messages) == expected
        assert [m["event_id"] for m in messages if m["type"] == "system"] == list(
            range(1, event_id + 1)
        )
        newest = HISTORY[-1].candle_time
        for m in messages:
            if m["type"] == "candle_forming":
                assert m["candle"]["candle_time"] > newest
            elif m["type"] in ("candle_closed", "candles_batch"):
                newest = closed_times([m])[-1]
        return messages

    trio.run(run)


# --- metrics ----------------------------------------------------------------------------


def histogram(metrics: Metrics, name: str) -> tuple[float, float]:
    lines = metrics.render().decode().splitlines()
    values = {
        line.split(" ")[0]: float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith(name) and "{" not in line
    }
    return values[f"{name}_count"], values[f"{name}_sum"]


async def test_delivery_latency_is_timed_to_the_last_subscriber_of_a_batch(
    autojump_clock: trio.testing.MockClock,
) -> None:
    name = "tradecanvas_delivery_latency_seconds"
    hub = make_hub(MemoryReader(HISTORY))
    fast, slow = FakeFrames(), FakeFrames()
    async with framed(hub, fast) as a, framed(hub, slow) as b:
        for subscriber in (a, b):
            hub.subscribe(subscriber, SERIES_1M, HISTORY[-1].candle_time, batch=False)
        await trio.testing.wait_all_tasks_blocked()
        received_at = trio.current_time()
        await trio.sleep(0.25)  # commit time
        with hub.metrics.delivery.publishing(received_at, trio.current_time):
            hub.publish_closed(SID_1M, LIVE[:1])  # both at once
        assert histogram(hub.metrics, name) == (1, 0.25)
        slow.block = True
        received_at = trio.current_time()
        with hub.metrics.delivery.publishing(received_at, trio.current_time):
            hub.publish_closed(SID_1M, LIVE[1:2])  # a at once, b queued
        slow.block = False
        assert histogram(hub.metrics, name) == (1, 0.25)  # b still owes it
        await trio.testing.wait_all_tasks_blocked()
        assert histogram(hub.metrics, name) == (2, 0.25)  # b sent it; no time passed
        with hub.metrics.delivery.publishing(None, trio.current_time):
            hub.publish_closed(SID_1M, LIVE[2:3])  # not from a frame: not timed
        assert histogram(hub.metrics, name)[0] == 2


async def test_queue_high_water_is_the_deepest_queue_of_the_last_minute_or_two(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = make_hub(MemoryReader(HISTORY))
    frames = FakeFrames()
    gauge = "tradecanvas_subscriber_queue_high_water"

    def value() -> float:
        for line in hub.metrics.render().decode().splitlines():
            if line.startswith(gauge + " "):
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(gauge)

    async with framed(hub, frames) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, HISTORY[-1].candle_time, batch=False)
        await trio.testing.wait_all_tasks_blocked()
        frames.block = True
        for candle in LIVE[:5]:
            hub.publish_closed(SID_1M, [candle])
        assert value() == 5
        frames.block = False
        await trio.testing.wait_all_tasks_blocked()
        assert subscriber.queue.idle
        assert value() == 5  # a peak: it stays a while, for scrapes that come later
        await trio.sleep(WINDOW_S)
        assert value() == 5
        # caught up for two windows: the gauge tells the present, not that slow moment
        # (a peak since the subscriber connected stayed at 5 as long as it did)
        await trio.sleep(WINDOW_S)
        assert value() == 0
        # a slow moment again, and the subscriber leaves before any scrape
        frames.block = True
        for candle in LIVE[5:8]:
            hub.publish_closed(SID_1M, [candle])
    assert hub.statistics().subscribers == 0
    assert value() == 3  # its peak is not lost with it
    await trio.sleep(2 * WINDOW_S)
    assert value() == 0


async def test_a_long_catch_up_goes_out_in_chunks_of_whole_frames() -> None:
    history = list(flat_minutes(T0 - 3000 * 60, 3000))
    hub = make_hub(MemoryReader(history))
    frames = FakeFrames()
    async with framed(hub, frames) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, history[0].candle_time - 60, batch=False)
        await trio.testing.wait_all_tasks_blocked()
    assert closed_times(frames.messages()) == [c.candle_time for c in history]
    # each write within its own deadline: several writes, none much over the chunk size
    assert len(frames.writes) > 1
    assert max(frames.writes) < WRITE_CHUNK_BYTES + 1024


@final
class StuckFrames(FakeFrames):
    """A client that does not read: writes wait until ``reading`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.reading = trio.Event()
        self.block = True
        self.written_to = False

    async def write(self, frames: bytes) -> None:
        self.written_to = True
        await self.reading.wait()
        await super().write(frames)


async def test_catch_ups_waiting_on_sockets_are_bounded_and_the_rest_wait_their_turn() -> None:
    """Clients that subscribe with a catch-up and do not read hold at most
    catchups_at_once store reads (and their messages) at a time; another subscriber's
    catch-up waits for a place and is served once one is given back."""
    reader = CountingReader(HISTORY)
    hub = make_hub(reader, catchups_at_once=2)
    stuck = [StuckFrames() for _ in range(3)]
    async with (
        framed(hub, stuck[0]) as a,
        framed(hub, stuck[1]) as b,
        framed(hub, stuck[2]) as c,
    ):
        for subscriber in (a, b, c):
            hub.subscribe(subscriber, SERIES_1M, None, batch=False)
        await trio.testing.wait_all_tasks_blocked()
        # two catch-ups wait on their sockets; the third waits for a place (which two got
        # one is the scheduler's choice)
        holding = [frames for frames in stuck if frames.written_to]
        assert reader.reads == 2 and len(holding) == 2
        holding[0].reading.set()  # one client reads: its place goes to the third
        await trio.testing.wait_all_tasks_blocked()
        assert reader.reads == 3 and all(frames.written_to for frames in stuck)
        assert closed_times(holding[0].messages()) == [h.candle_time for h in HISTORY]
        for frames in stuck:
            frames.reading.set()
        await trio.testing.wait_all_tasks_blocked()
        for frames in stuck:
            assert closed_times(frames.messages()) == [h.candle_time for h in HISTORY]


async def test_a_holder_that_does_not_read_is_cut_after_the_contended_write_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Alone, a catch-up's write may take the whole send timeout; once another catch-up
    waits for its place, the write must finish within CONTENDED_WRITE_S (4008 if not), and
    the waiting one goes on."""
    reader = CountingReader(HISTORY)
    hub = make_hub(reader, catchups_at_once=1, send_timeout_s=30.0)
    stuck, reading = StuckFrames(), FakeFrames()
    reading.block = True  # everything through the publish task
    async with framed(hub, stuck) as hog, framed(hub, reading) as other:
        hub.subscribe(hog, SERIES_1M, None, batch=False)
        await trio.sleep(CONTENDED_WRITE_S * 2)  # alone: not cut
        assert (hog.close_code, reader.reads) == (None, 1)
        started = trio.current_time()
        hub.subscribe(other, SERIES_1M, None, batch=False)
        await trio.sleep(CONTENDED_WRITE_S + 0.1)
        assert hog.close_code == 4008
        assert hog.close_reason == (
            f"slow consumer: a catch-up write took longer than {CONTENDED_WRITE_S:g}s"
            " while other catch-ups waited"
        )
        assert trio.current_time() - started < 30.0
        await trio.testing.wait_all_tasks_blocked()
        assert closed_times(reading.messages()) == [h.candle_time for h in HISTORY]


@asynccontextmanager
async def watched(subscriber: Subscriber, stall_timeout_s: float) -> AsyncIterator[InFlight]:
    """``subscriber``'s connection watched by a stall watch of its own, as a session on
    either port has it: the deadlines of its publish task's writes are the watch's sweep's
    to enforce. (Nothing written through the fake frames is counted in flight: the stall
    clock stays at 0.)"""
    watch = StallWatch(stall_timeout_s)
    async with loopback() as (server, _), trio.open_nursery() as nursery:
        in_flight = subscriber.in_flight = InFlight(server, trio.current_time())
        nursery.start_soon(watch.watch, subscriber, in_flight)
        await trio.testing.wait_all_tasks_blocked()
        yield in_flight
        nursery.cancel_scope.cancel()


async def test_a_watched_holder_that_does_not_read_is_cut_by_the_sweep_after_the_contended_write_time(  # noqa: E501
    autojump_clock: trio.testing.MockClock,
) -> None:
    """As above where the stall watch enforces the writes' deadlines (a stall timeout of
    600 s: its ticks a minute apart): the hurried write is cut when CONTENDED_WRITE_S has
    passed, with the same reason."""
    reader = CountingReader(HISTORY)
    hub = make_hub(reader, catchups_at_once=1, send_timeout_s=30.0)
    stuck, reading = StuckFrames(), FakeFrames()
    reading.block = True  # everything through the publish task
    async with framed(hub, stuck) as hog, framed(hub, reading) as other, watched(hog, 600.0):
        hub.subscribe(hog, SERIES_1M, None, batch=False)
        await trio.sleep(CONTENDED_WRITE_S * 2)  # alone: not cut
        assert (hog.close_code, reader.reads) == (None, 1)
        hub.subscribe(other, SERIES_1M, None, batch=False)
        await trio.sleep(CONTENDED_WRITE_S - 0.01)
        assert not hog.closing
        await trio.sleep(0.02)
        assert hog.close_code == 4008
        assert hog.close_reason == (
            f"slow consumer: a catch-up write took longer than {CONTENDED_WRITE_S:g}s"
            " while other catch-ups waited"
        )
        await trio.testing.wait_all_tasks_blocked()
        assert closed_times(reading.messages()) == [h.candle_time for h in HISTORY]


async def test_a_pause_of_the_daemon_during_a_contended_write_closes_no_holder(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """The daemon stops for 100 s while a hurried holder's write is blocked: it is not cut
    on resuming (a trio deadline on its send scope expired then), but once its write has
    run out the contended write time after all, with that reason."""
    reader = CountingReader(HISTORY)
    hub = make_hub(reader, catchups_at_once=1, send_timeout_s=30.0)
    stuck, reading = StuckFrames(), FakeFrames()
    reading.block = True  # everything through the publish task
    async with (
        framed(hub, stuck) as hog,
        framed(hub, reading) as other,
        watched(hog, 600.0) as in_flight,
    ):
        hub.subscribe(hog, SERIES_1M, None, batch=False)
        await trio.sleep(CONTENDED_WRITE_S * 2)
        hub.subscribe(other, SERIES_1M, None, batch=False)
        await trio.sleep(CONTENDED_WRITE_S / 2)
        autojump_clock.jump(100.0)  # nothing runs meanwhile: the whole process paused
        await trio.testing.wait_all_tasks_blocked()
        assert not hog.closing
        # what is left: at most the write's whole (hurried) timeout again
        left = in_flight.send_deadline - trio.current_time()
        assert 0 < left <= in_flight.send_deadline - in_flight.send_started
        await trio.sleep(left - 0.01)
        assert not hog.closing
        await trio.sleep(0.02)
        assert hog.close_code == 4008
        assert hog.close_reason == (
            f"slow consumer: a catch-up write took longer than {CONTENDED_WRITE_S:g}s"
            " while other catch-ups waited"
        )
        await trio.testing.wait_all_tasks_blocked()
        assert closed_times(reading.messages()) == [h.candle_time for h in HISTORY]
