"""The Hub, the trio shell around the subscriber queue: the publish task carrying out drain
plans (store reads, encoding, sends), close codes (4008 for a slow send or a lag, 1011, 1001),
failure reporting for best_effort; then socket-level tests: exactly-once delivery while
candles flow, slow consumers cut off alone, broken connections isolated, a thousand
subscribers.

The queue's rules (catch-up, healing, gaps, coalescing, cursors, the slow-consumer policy)
are tested without trio in tests/serve/test_subscriber_queue.py. The first tests here use a
fake connection and an in-memory store, no sockets; the socket-level ones run real
trio-websocket clients against the real server on 127.0.0.1 and a real SQLite store.
"""

from __future__ import annotations

import itertools
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Final, final

import pytest
import trio
import trio.testing
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import flat_minutes
from tests.serve.test_ws_server import (
    SERIES_1M,
    SERIES_5M,
    SID_1M,
    SID_5M,
    TRANSPORTS,
    close_code_of,
    closed_times,
    connect,
    real_candles,
    receive,
    running_market,
    send,
    subscribe_msg,
    until_pong,
)
from tradecanvas.errors import StoreError
from tradecanvas.model import Candle, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.frame_safe_stream import FrameSafeStream
from tradecanvas.serve.hub import CandleReader, Hub
from tradecanvas.serve.subscriber import FrameWriter, Subscriber, TransportClosed
from tradecanvas.serve.subscriber_queue import SubscriberQueue
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.types import StoredEvent
from tradecanvas.wire.json import loads

T0: Final = 1751760000  # 2025-07-06 00:00 UTC, the first candle of the real futures week


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    yield opened
    await opened.aclose()


def gaps(messages: list[dict[str, Any]]) -> list[tuple[int, int]]:
    return [(m["expected_next_time"], m["actual_time"]) for m in messages if m["type"] == "gap"]


def metric(market_metrics: Metrics, line_start: str) -> float:
    for line in market_metrics.render().decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no metric line {line_start}")


# --- the shell without sockets ----------------------------------------------------------


class MemoryReader:
    """CandleReader over a dict (no threads, so the autojump clock stays exact)."""

    def __init__(self, candles: Sequence[Candle] = (), *, fail: bool = False) -> None:
        self.candles = {SID_1M: list(candles)}
        self.fail = fail

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise StoreError("disk I/O error")
        return self.candles.get(series_id, [])[-limit:]

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        await trio.lowlevel.checkpoint()
        if self.fail:
            raise StoreError("disk I/O error")
        return [c for c in self.candles.get(series_id, []) if c.candle_time > since][:limit]

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = 1000
    ) -> list[StoredEvent]:
        await trio.lowlevel.checkpoint()
        return []

    async def events_pruned_upto(self) -> int:
        await trio.lowlevel.checkpoint()
        return 0

    async def events_newest_id(self) -> int:
        await trio.lowlevel.checkpoint()
        return 0


@final
class FakeSocket:
    """A connection that records what is sent; ``stall`` makes every send wait forever,
    ``error`` makes every send raise it."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.stall = False
        self.error: Exception | None = None
        self._more = trio.Event()
        self._read = 0

    async def send_message(self, message: str) -> None:
        await trio.lowlevel.checkpoint()
        if self.error is not None:
            raise self.error
        if self.stall:
            await trio.sleep_forever()
        self.sent.append(loads(message))
        self._more.set()
        self._more = trio.Event()

    async def until_pong(self, subscriber: Subscriber) -> list[dict[str, Any]]:
        """Queue a pong; what was sent since the last pong and before this one (the queue
        keeps the order)."""
        subscriber.send_control({"type": "pong"})
        while {"type": "pong"} not in self.sent[self._read :]:
            await self._more.wait()
        got = self.sent[self._read :]
        end = got.index({"type": "pong"})
        self._read += end + 1
        return got[:end]


def make_hub(store: CandleReader, **overrides: Any) -> Hub:
    settings: dict[str, Any] = {"queue_max": 1024, "send_timeout_s": 5.0, "catchup_limit": 5000}
    settings.update(overrides)
    return Hub(store, series=[SERIES_1M, SERIES_5M], metrics=Metrics(), **settings)


@asynccontextmanager
async def connected(
    hub: Hub, socket: FakeSocket, frames: FrameWriter | None = None
) -> AsyncIterator[Subscriber]:
    """Attach a fake connection (with ``frames``, its pre-framed writer) and run its publish
    task in its cancel scope, as the WS server does; detach at the end."""
    subscriber = hub.attach(socket, peer="fake:1", max_subscriptions=64, frames=frames)

    async def publish_task() -> None:
        with subscriber.cancel_scope:
            await hub.run_publisher(subscriber)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(publish_task)
            yield subscriber
            subscriber.cancel_scope.cancel()
    finally:
        hub.detach(subscriber)


async def settled() -> None:
    """Let every publish task do what it can."""
    await trio.testing.wait_all_tasks_blocked()


async def test_the_publish_task_encodes_batches_and_plain_messages() -> None:
    # the shell half of tests/serve/test_subscriber_queue.py's catch-up tests
    minutes = real_candles()[:25]
    t = [c.candle_time for c in minutes]
    hub = make_hub(MemoryReader(minutes), catchup_limit=7)
    async with connected(hub, FakeSocket()) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, t[4], batch=True)
        await settled()
        socket = subscriber.socket
        assert isinstance(socket, FakeSocket)
        assert [len(m["candles"]) for m in socket.sent] == [7, 7, 6]
        assert socket.sent[0] == {
            "type": "candles_batch",
            "series_id": SID_1M,
            "candles": [c.to_wire() for c in minutes[5:12]],
        }
        socket.sent.clear()
        hub.subscribe(subscriber, SERIES_1M, t[20], batch=False)
        await settled()
        assert socket.sent == [
            {"type": "candle_closed", "series_id": SID_1M, "candle": c.to_wire()}
            for c in minutes[21:]
        ]


async def test_gaps_are_sent_and_counted() -> None:
    minutes = real_candles()[:6]
    t = [c.candle_time for c in minutes]
    reader = MemoryReader(minutes[:3])
    hub = make_hub(reader)
    socket = FakeSocket()
    async with connected(hub, socket) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, t[1], batch=True)
        await settled()
        reader.candles[SID_1M].append(minutes[5])
        assert hub.publish_closed(SID_1M, minutes[5:]) == []
        await settled()
        assert socket.sent[1:] == [
            {"type": "gap", "series_id": SID_1M, "expected_next_time": t[3], "actual_time": t[5]},
            {"type": "candles_batch", "series_id": SID_1M, "candles": [minutes[5].to_wire()]},
        ]
    assert metric(hub.metrics, "tradecanvas_gaps_total") == 1.0


async def test_system_messages_go_to_that_series_only_after_its_candles(
    store: CandleStore,
) -> None:
    minutes = real_candles()[:5]
    fives = real_candles("5m")[:1]
    hub = make_hub(store)
    ws_1m, ws_5m = FakeSocket(), FakeSocket()
    async with connected(hub, ws_1m) as one, connected(hub, ws_5m) as five:
        hub.subscribe(one, SERIES_1M, None, batch=True)
        hub.subscribe(five, SERIES_5M, None, batch=True)
        assert await ws_1m.until_pong(one) == [] and await ws_5m.until_pong(five) == []
        pipeline = IngestPipeline(store, hub, [Timeframe.parse("5m")], "test")
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes, "ws"))
        assert pipeline.publish(result, best_effort=False) == 0
        sent_1m = await ws_1m.until_pong(one)
        assert [m["type"] for m in sent_1m] == ["candles_batch", "system"]
        assert closed_times(sent_1m) == [c.candle_time for c in minutes]
        assert sent_1m[1]["data"]["reason"] == "new_series"
        sent_5m = await ws_5m.until_pong(five)
        assert [m["type"] for m in sent_5m] == ["candles_batch", "system"]
        assert sent_5m[0]["candles"] == [fives[0].to_wire()]  # derived exactly like Binance's
        assert sent_5m[1]["series_id"] == SID_5M


async def test_a_send_over_send_timeout_s_closes_4008(
    autojump_clock: trio.testing.MockClock,
) -> None:
    hub = make_hub(MemoryReader(real_candles()[:3]), send_timeout_s=2.0)
    socket = FakeSocket()
    socket.stall = True
    async with connected(hub, socket) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=True)
        await trio.sleep(1.9)
        assert (subscriber.close_code, subscriber.closing) == (None, False)
        await trio.sleep(0.2)
        assert subscriber.close_code == 4008
        assert subscriber.close_reason == "slow consumer: a send took longer than 2s"
        assert subscriber.disconnect_reason == "slow_consumer"
    text = hub.metrics.render().decode()
    assert 'tradecanvas_subscriber_disconnects_total{reason="slow_consumer"} 1.0' in text


async def test_lagging_past_max_lag_s_closes_4008(autojump_clock: trio.testing.MockClock) -> None:
    minutes = list(flat_minutes(T0, 10))
    reader = MemoryReader(minutes[:1])
    hub = make_hub(reader, queue_max=2, send_timeout_s=60.0, max_lag_s=3.0)
    socket = FakeSocket()
    async with connected(hub, socket) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=True)
        socket.stall = True  # the catch-up send blocks: the live candles pile up
        await trio.sleep(1.0)
        reader.candles[SID_1M].extend(minutes[1:])
        for c in minutes[1:]:
            assert hub.publish_closed(SID_1M, [c]) == []  # lagging is not a failure
        assert subscriber.queue.lagging_since == trio.current_time()
        assert subscriber.lag_scope.deadline == trio.current_time() + 3.0
        await trio.sleep(2.9)
        assert (subscriber.close_code, subscriber.closing) == (None, False)
        await trio.sleep(0.2)
        assert subscriber.close_code == 4008
        assert subscriber.close_reason == "slow consumer: lagging for more than 3s"


async def test_a_lag_that_heals_in_time_is_not_closed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    minutes = list(flat_minutes(T0, 10))
    reader = MemoryReader(minutes)
    hub = make_hub(reader, queue_max=2, max_lag_s=3.0)
    socket = FakeSocket()
    async with connected(hub, socket) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, T0 + 60 * 9, batch=True)
        await settled()
        more = list(flat_minutes(T0 + 600, 5))
        reader.candles[SID_1M].extend(more)
        for c in more:
            hub.publish_closed(SID_1M, [c])
        assert subscriber.lag_scope.deadline < float("inf")
        await settled()  # healed from the store
        assert subscriber.queue.lagging_since is None
        assert subscriber.lag_scope.deadline == float("inf")
        await trio.sleep(10)
        assert subscriber.close_code is None
        assert closed_times(socket.sent) == [c.candle_time for c in more]


async def test_a_subscriber_gone_is_reported_by_no_publish() -> None:
    minutes = list(flat_minutes(T0, 3))
    hub = make_hub(MemoryReader(minutes))
    healthy_socket = FakeSocket()
    async with connected(hub, healthy_socket) as healthy:
        hub.subscribe(healthy, SERIES_1M, T0 - 60, batch=True)
        async with connected(hub, FakeSocket()) as victim:
            hub.subscribe(victim, SERIES_1M, T0 - 60, batch=True)
            hub.subscribe(victim, SERIES_5M, None, batch=True)
            await settled()
            victim.fail("connection lost", disconnect_reason="connection_lost")
        await hub.wait_subscribers(1)
        event = SystemEvent(SID_1M, "revision", T0, T0)
        # a client leaving is no failure of a publish, on any series it held
        assert hub.publish_system(event) == []
        assert hub.publish_system(event) == []
        assert not hub.publish_closed(SID_5M, real_candles("5m")[:1])  # none subscribed
        await settled()
        assert healthy_socket.sent[-2:] == [event.to_wire(), event.to_wire()]


async def test_an_error_while_queueing_isolates_that_subscriber_with_1011(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hub = make_hub(MemoryReader())
    async with connected(hub, FakeSocket()) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=True)
        await settled()

        def broken(*args: object) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(SubscriberQueue, "offer_closed", broken)  # slotted instances
        failures = hub.publish_closed(SID_1M, list(flat_minutes(T0, 1)))
        assert failures == ["subscriber fake:1: RuntimeError: bug"]
        assert (subscriber.close_code, subscriber.disconnect_reason) == (1011, "internal_error")


async def test_a_goodbye_during_a_send_is_a_normal_end_and_a_break_a_failure() -> None:
    hub = make_hub(MemoryReader(real_candles()[:2]))
    for code, reason, failure in (
        (1000, "client_closed", None),
        (None, "send_failed", "delivery failed: TransportClosed"),
    ):
        socket = FakeSocket()
        socket.error = TransportClosed(code)
        async with connected(hub, socket) as subscriber:
            hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=True)
            await settled()
            assert subscriber.disconnect_reason == reason
            assert (subscriber.failure or "").startswith(failure or "")
            assert (subscriber.failure is None) == (failure is None)


async def test_a_store_failure_closes_only_that_subscriber_with_1011() -> None:
    hub = make_hub(MemoryReader(fail=True))
    async with connected(hub, FakeSocket()) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, T0 - 60, batch=True)
        await settled()
        assert (subscriber.close_code, subscriber.close_reason) == (1011, "store unavailable")


async def test_close_all_closes_every_subscriber() -> None:
    hub = make_hub(MemoryReader())
    async with connected(hub, FakeSocket()) as one, connected(hub, FakeSocket()) as two:
        hub.close_all(1001, "server shutdown", disconnect_reason="shutdown")
        assert [(s.close_code, s.disconnect_reason) for s in (one, two)] == [
            (1001, "shutdown"),
            (1001, "shutdown"),
        ]
        assert one.cancel_scope.cancel_called and two.cancel_scope.cancel_called
    assert hub.statistics().subscribers == 0


# --- socket level ---------------------------------------------------------------------


# --- exactly once while live candles flow (hypothesis over interleavings) ---------------


@final
class GatedStore:
    """The real store's reads, with test steps run right before and after each read, so a
    commit and a publish can land between registration, the catch-up read and its send."""

    def __init__(self, store: CandleStore, steps: list[Callable[[], Awaitable[None]]]) -> None:
        self.store = store
        self.steps = steps
        self.reads = 0
        self.running = 0
        self._idle = trio.Event()

    async def _step(self) -> None:
        if self.steps:
            self.running += 1
            try:
                await self.steps.pop(0)()
            finally:
                self.running -= 1
                if not self.running:
                    self._idle.set()
                    self._idle = trio.Event()

    async def run_remaining_steps(self) -> None:
        """Run the steps no read used, and wait for any a read is running."""
        while self.steps or self.running:
            if self.steps:
                await self._step()
            else:
                await self._idle.wait()

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        self.reads += 1
        await self._step()
        result = await self.store.tail(series_id, limit)
        await self._step()
        return result

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        self.reads += 1
        await self._step()
        result = await self.store.since(series_id, since, limit)
        await self._step()
        return result


@final
class LiveFeed:
    """Commits and publishes 1m candles the way ingest does: commit first, publish after."""

    def __init__(self, store: CandleStore, start: int) -> None:
        self.store = store
        self.hub: Hub | None = None
        self.next_time = start
        self.held: list[Candle] = []
        # one op at a time, like one ingest path: a commit and its publish are not split by
        # another op (the read hooks and the test body both run ops)
        self.lock = trio.Lock()

    def _make(self, count: int) -> list[Candle]:
        made = list(flat_minutes(self.next_time, count, price=str(100 + self.next_time % 7)))
        self.next_time += 60 * count
        return made

    async def run(self, op: tuple[str, int]) -> None:
        async with self.lock:
            await self._run(op)

    async def _run(self, op: tuple[str, int]) -> None:
        kind, n = op
        assert self.hub is not None
        if kind == "publish":
            candles = self._make(n)
            await self.store.upsert(SID_1M, candles, "ws")
            self.hub.publish_closed(SID_1M, candles)
        elif kind == "commit":  # its publish is late, or a strict publish aborted before it
            candles = self._make(n)
            await self.store.upsert(SID_1M, candles, "ws")
            self.held.extend(candles)
        elif kind == "publish_late":
            self.hub.publish_closed(SID_1M, self.held)
            self.held = []
        elif kind == "skip":  # missing at the exchange: a real hole
            self.next_time += 60 * n
        elif kind == "forming":
            self.hub.publish_forming(SID_1M, next(iter(flat_minutes(self.next_time, 1))))
        else:
            await trio.lowlevel.checkpoint()


OPS: Final = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 4)),
    st.tuples(st.just("commit"), st.integers(1, 3)),
    st.tuples(st.just("publish_late"), st.just(0)),
    st.tuples(st.just("skip"), st.integers(1, 2)),
    st.tuples(st.just("forming"), st.just(0)),
    st.tuples(st.just("yield"), st.just(0)),
)


@pytest.mark.slow
@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    history=st.integers(0, 12),
    since_choice=st.sampled_from(["stored", "before", "null", "head"]),
    batch=st.booleans(),
    queue_max=st.sampled_from([2, 5, 1000]),
    catchup_limit=st.sampled_from([1, 3, 50]),
    groups=st.lists(st.lists(OPS, max_size=3), max_size=6),
    tail=st.lists(OPS, max_size=6),
    forming_first=st.booleans(),
)
async def test_subscribing_while_candles_flow_is_exactly_once_and_contiguous(
    history: int,
    since_choice: str,
    batch: bool,
    queue_max: int,
    catchup_limit: int,
    groups: list[list[tuple[str, int]]],
    tail: list[tuple[str, int]],
    forming_first: bool,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = await CandleStore.open(Path(tmp) / "market.sqlite3")
        try:
            feed = LiveFeed(store, T0)
            stored = [c.candle_time for c in list(flat_minutes(T0, history))]
            if history:
                await store.upsert(SID_1M, feed._make(history), "rest")
            since = {
                "stored": stored[history // 2] if stored else None,
                "before": T0 - 600,
                "null": None,
                "head": stored[-1] if stored else None,
            }[since_choice]

            def step(ops: list[tuple[str, int]]) -> Callable[[], Awaitable[None]]:
                async def run_ops() -> None:
                    for op in ops:
                        await feed.run(op)

                return run_ops

            gated = GatedStore(store, [step(g) for g in groups])
            async with (
                running_market(gated, queue_max=queue_max, catchup_limit=catchup_limit) as market,
                connect(market.port) as ws,
            ):
                feed.hub = market.hub
                if forming_first:  # the subscribe's snapshot (tests/serve/test_hub_forming.py)
                    await feed.run(("forming", 0))
                await send(ws, subscribe_msg(SID_1M, since=since, batch=batch))
                received: list[dict[str, Any]] = []

                async def read_everything() -> None:
                    while True:
                        received.append(await receive(ws))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(read_everything)
                    for op in tail:
                        await feed.run(op)
                    # whatever the hooks did not use runs now, then everything is published
                    await gated.run_remaining_steps()
                    await feed.run(("publish_late", 0))
                    await feed.run(("publish", 1))
                    nursery.cancel_scope.cancel()
                received.extend(await until_pong(ws))
            final = [c.candle_time for c in await store.since(SID_1M, -1, 10_000)]
        finally:
            await store.aclose()
    times = closed_times(received)
    assert times == sorted(set(times)), "duplicate or out of order"
    errors = [m for m in received if m["type"] == "error"]
    assert errors == []
    if since is None:
        assert times, "the final publish must arrive"
        expected = [t for t in final if t >= times[0]]
        # the catch-up was the newest catchup_limit at its read, the rest live
        assert len([t for t in times if t <= (stored[-1] if stored else -1)]) <= catchup_limit
    else:
        expected = [t for t in final if t > since]
    assert times == expected
    # a gap exactly where the store has a hole, after a cursor that is a real candle
    anchored = [since] if since is not None and since in final else []
    delivered = anchored + times
    expected_gaps = [(a + 60, b) for a, b in itertools.pairwise(delivered) if b - a > 60]
    assert gaps(received) == expected_gaps
    # forming updates never at or below the cursor at the time they were sent
    cursor = since if since is not None else -1
    for m in received:
        if m["type"] == "candle_forming":
            assert m["candle"]["candle_time"] > cursor
        cursor = max([cursor, *closed_times([m])])
    # and never ahead of a close: no close comes after a forming update of a later bar
    newest_forming = -1
    for m in received:
        if m["type"] == "candle_forming":
            newest_forming = max(newest_forming, m["candle"]["candle_time"])
        assert all(t >= newest_forming for t in closed_times([m])), "overtaken"


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_never_reading_subscriber_is_closed_4008_and_a_healthy_one_gets_everything(
    store: CandleStore, over: str
) -> None:
    # ~2 MB of batches: far more than the stalled client's socket buffers take
    minutes = list(flat_minutes(T0, 20_000, price="108123.45"))
    async with (
        running_market(store, send_timeout_s=0.2, catchup_limit=100, over=over) as market,
        connect(market.port) as healthy,
        connect(market.port, receive_buffer=4096, message_queue_size=1) as stalled,
    ):
        await send(healthy, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        await send(stalled, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        assert await until_pong(healthy) == []
        published: list[int] = []
        got: list[int] = []

        async def read_healthy() -> None:
            while (message := await receive(healthy))["type"] != "pong":
                got.extend(closed_times([message]))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_healthy)
            for start in range(0, len(minutes), 100):
                if market.hub.statistics().subscribers == 1:
                    break  # the stalled one is gone: enough
                chunk = minutes[start : start + 100]
                await store.upsert(SID_1M, chunk, "ws")
                assert market.hub.publish_closed(SID_1M, chunk) == []
                published.extend(c.candle_time for c in chunk)
            # its send blocks; after 0.2 s it is closed, nobody else waited for it
            await market.hub.wait_subscribers(1)
            await send(healthy, {"type": "ping"})
        assert got == published
        assert (
            metric(
                market.metrics, 'tradecanvas_subscriber_disconnects_total{reason="slow_consumer"}'
            )
            == 1.0
        )
        # reading again now, it finds whole messages and then the 4008 close frame
        assert await close_code_of(stalled) == 4008


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_subscriber_lagging_too_long_is_closed_4008(store: CandleStore, over: str) -> None:
    history = list(flat_minutes(T0, 20_000, price="108123.45"))
    await store.upsert(SID_1M, history, "ws")
    live = list(flat_minutes(T0 + 60 * len(history), 20))
    async with (
        running_market(
            store, queue_max=8, send_timeout_s=60, catchup_limit=100, max_lag_s=0.2, over=over
        ) as market,
        connect(market.port, receive_buffer=4096, message_queue_size=1) as stalled,
    ):
        # its catch-up (~2 MB) backs up; the live candles overflow its queue: lagging
        await send(stalled, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        await market.hub.wait_subscribers(1)
        await store.upsert(SID_1M, live, "ws")
        for c in live:
            assert market.hub.publish_closed(SID_1M, [c]) == []  # lagging is not a failure
        (stalled_subscriber,) = market.hub.subscribers()
        assert stalled_subscriber.queue.lagging_since is not None
        with trio.fail_after(10):
            await market.hub.wait_subscribers(0)
        assert stalled_subscriber.disconnect_reason == "slow_consumer"
        assert await close_code_of(stalled) == 4008


# --- failure isolation and best_effort --------------------------------------------------


async def _broken_subscriber(port: int, series_id: str) -> None:
    """Subscribe, then vanish without a close handshake (the TCP connection just ends)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        async with trio.open_nursery() as nursery:
            ws = await trio_websocket.wrap_client_stream(nursery, stream, "127.0.0.1", "/ws/market")
            await send(ws, subscribe_msg(series_id))
            await until_pong(ws)
            nursery.cancel_scope.cancel()
    finally:
        await stream.aclose()


async def test_a_broken_subscriber_is_isolated_with_best_effort(store: CandleStore) -> None:
    minutes = real_candles()[:10]
    async with running_market(store) as market, connect(market.port) as healthy:
        await send(healthy, subscribe_msg(SID_1M, batch=True))
        await send(healthy, subscribe_msg(SID_5M, batch=True))
        assert await until_pong(healthy) == []
        await _broken_subscriber(market.port, SID_1M)
        await market.hub.wait_subscribers(1)
        pipeline = IngestPipeline(store, market.hub, [Timeframe.parse("5m")], "test")
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[:5], "ws"))
        assert pipeline.publish(result, best_effort=True) == 0  # a client gone fails no step
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[5:], "ws"))
        assert pipeline.publish(result, best_effort=True) == 0
        messages = await until_pong(healthy)
        assert closed_times(messages, SID_1M) == [c.candle_time for c in minutes]
        assert closed_times(messages, SID_5M) == [c.candle_time for c in real_candles("5m")[:2]]
        assert (
            metric(
                market.metrics, 'tradecanvas_subscriber_disconnects_total{reason="connection_lost"}'
            )
            == 1.0
        )


async def test_a_strict_publish_does_not_fail_for_a_client_gone(
    store: CandleStore,
) -> None:
    minutes = real_candles()[:10]
    fives = real_candles("5m")[:2]
    async with running_market(store) as market, connect(market.port) as healthy:
        await send(healthy, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        await send(healthy, subscribe_msg(SID_5M, since=T0 - 300, batch=True))
        assert await until_pong(healthy) == []
        await _broken_subscriber(market.port, SID_1M)
        await market.hub.wait_subscribers(1)
        pipeline = IngestPipeline(store, market.hub, [Timeframe.parse("5m")], "test")
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[:5], "ws"))
        # a chart that went away does not turn an HTTP write into a 503 (no PublishError)
        assert pipeline.publish(result, best_effort=False) == 0
        first = await until_pong(healthy)
        assert closed_times(first, SID_1M) == [c.candle_time for c in minutes[:5]]
        assert closed_times(first, SID_5M) == [fives[0].candle_time]
        assert {m["series_id"] for m in first if m["type"] == "system"} == {SID_1M, SID_5M}
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[5:], "ws"))
        assert pipeline.publish(result, best_effort=False) == 0
        second = await until_pong(healthy)
        assert closed_times(second, SID_1M) == [c.candle_time for c in minutes[5:]]
        assert closed_times(second, SID_5M) == [fives[1].candle_time]
        assert gaps(second) == []


async def test_a_send_failure_in_the_publish_task_isolates_only_that_subscriber(
    store: CandleStore,
) -> None:
    minutes = real_candles()[:3]
    await store.upsert(SID_1M, minutes, "ws")
    async with running_market(store) as market, connect(market.port) as healthy:
        await send(healthy, subscribe_msg(SID_1M, since=T0 - 60))
        assert len(await until_pong(healthy)) == 3
        async with connect(market.port) as victim:
            await send(victim, subscribe_msg(SID_1M, since=T0 - 60))
            assert len(await until_pong(victim)) == 3
            # break the server side of the victim's socket for sending only: its reader
            # notices nothing, its publish task's next send fails
            subscribers = market.hub.subscribers()
            assert len(subscribers) == 2
            target = subscribers[-1]  # attached second
            transport: Any = target.socket  # the WS port's transport and its stream
            stream = transport.stream
            assert isinstance(stream, FrameSafeStream)
            assert target.frames is transport
            stream.inner.socket.shutdown(socket.SHUT_WR)
            nxt = next(iter(flat_minutes(minutes[-1].candle_time + 60, 1)))
            await store.upsert(SID_1M, [nxt], "ws")
            assert market.hub.publish_closed(SID_1M, [nxt]) == []
            await market.hub.wait_subscribers(1)
            # the send failed; its reader may notice the aborted connection first
            assert target.disconnect_reason in ("send_failed", "connection_lost")
            # a client gone: the next publish does not report it as a failure either
            later = next(iter(flat_minutes(nxt.candle_time + 60, 1)))
            await store.upsert(SID_1M, [later], "ws")
            assert market.hub.publish_closed(SID_1M, [later]) == []
        assert closed_times(await until_pong(healthy)) == [nxt.candle_time, later.candle_time]


# --- scale ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_thousand_subscribers_connect_and_receive(store: CandleStore) -> None:
    count = 1000
    minutes = real_candles()[:3]
    await store.upsert(SID_1M, minutes[:2], "ws")
    done: list[list[int]] = []
    all_subscribed = trio.Event()
    subscribed: list[None] = []
    publish_now = trio.Event()

    async def subscriber(port: int) -> None:
        async with connect(port) as ws:
            await send(ws, subscribe_msg(SID_1M, since=minutes[0].candle_time, batch=True))
            seen = closed_times(await until_pong(ws))
            subscribed.append(None)
            if len(subscribed) == count:
                all_subscribed.set()
            await publish_now.wait()
            seen += closed_times([await receive(ws)])
            done.append(seen)

    with trio.fail_after(60):
        async with running_market(store) as market, trio.open_nursery() as nursery:
            for _ in range(count):
                nursery.start_soon(subscriber, market.port)
            await all_subscribed.wait()
            assert market.hub.statistics().subscribers == count
            await store.upsert(SID_1M, minutes[2:], "ws")
            publish_now.set()
            assert market.hub.publish_closed(SID_1M, minutes[2:]) == []
    expected = [c.candle_time for c in minutes[1:]]
    assert len(done) == count
    assert all(seen == expected for seen in done)
    assert market.hub.statistics().subscribers == 0
