"""The Hub: catch-up, exactly-once delivery under live flow, coalescing, the slow-consumer
policy, failure isolation (best_effort) and many subscribers.

Real trio-websocket clients against the real server on 127.0.0.1 and a real SQLite store.
"""

from __future__ import annotations

import itertools
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, final

import attrs
import pytest
import trio
import trio_websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import flat_minutes
from tests.serve.test_ws_server import (
    SERIES_1M,
    SID_1M,
    SID_5M,
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
from tradecanvas.errors import PublishError
from tradecanvas.model import Candle, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline import IngestBatch, IngestPipeline, SystemEvent
from tradecanvas.serve.frame_safe_stream import FrameSafeStream
from tradecanvas.serve.hub import Hub
from tradecanvas.store.sqlite import CandleStore

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


# --- catch-up -------------------------------------------------------------------------


async def test_catch_up_is_exclusive_and_split_by_catchup_limit(store: CandleStore) -> None:
    minutes = real_candles()[:25]
    await store.upsert(SID_1M, minutes, "ws")
    t = [c.candle_time for c in minutes]
    async with running_market(store, catchup_limit=7) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_1M, since=t[4], batch=True))
        messages = await until_pong(ws)
        # 20 candles after the cursor: 7 + 7 + 6, every one exactly once, in order
        assert [len(m["candles"]) for m in messages] == [7, 7, 6]
        assert closed_times(messages) == t[5:]
        assert messages[0]["candles"][0] == minutes[5].to_wire()
        # one candle_closed per candle for a plain subscriber
        await send(ws, subscribe_msg(SID_1M, since=t[20]))
        plain = await until_pong(ws)
        assert [m["type"] for m in plain] == ["candle_closed"] * 4
        assert closed_times(plain) == t[21:]
        # since beyond the head: nothing yet, then live
        await send(ws, subscribe_msg(SID_1M, since=t[24], batch=True))
        assert await until_pong(ws) == []


async def test_since_null_sends_the_newest_catchup_limit_then_live(store: CandleStore) -> None:
    minutes = real_candles()[:30]
    await store.upsert(SID_1M, minutes[:20], "ws")
    async with running_market(store, catchup_limit=8) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_1M, since=None, batch=True))
        messages = await until_pong(ws)
        assert closed_times(messages) == [c.candle_time for c in minutes[12:20]]
        await store.upsert(SID_1M, minutes[20:22], "ws")
        market.hub.publish_closed(SID_1M, minutes[20:22])
        assert closed_times([await receive(ws)]) == [c.candle_time for c in minutes[20:22]]


async def test_since_null_on_an_empty_store_heals_from_the_first_stored_candle(
    store: CandleStore,
) -> None:
    minutes = real_candles()[:6]
    async with running_market(store) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_1M, since=None, batch=True))
        assert await until_pong(ws) == []
        # committed but never published (a strict publish aborted before this series) …
        await store.upsert(SID_1M, minutes[:3], "ws")
        # … then the next publish: the hole is healed from the store, no gap
        await store.upsert(SID_1M, minutes[3:], "ws")
        market.hub.publish_closed(SID_1M, minutes[3:])
        messages = await until_pong(ws)
        assert closed_times(messages) == [c.candle_time for c in minutes]
        assert gaps(messages) == []


async def test_catch_up_of_a_derived_series(store: CandleStore) -> None:
    fives = real_candles("5m")[:12]
    await store.upsert(SID_5M, fives, "derived")
    async with running_market(store) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_5M, since=fives[2].candle_time))
        messages = await until_pong(ws)
        assert [m["candle"] for m in messages] == [c.to_wire() for c in fives[3:]]


# --- gaps and healing -----------------------------------------------------------------


async def test_holes_are_healed_from_the_store_and_only_store_holes_are_gaps(
    store: CandleStore,
) -> None:
    minutes = real_candles()[:12]
    t = [c.candle_time for c in minutes]
    await store.upsert(SID_1M, minutes[:3], "ws")
    async with running_market(store) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_1M, since=t[1], batch=True))
        assert closed_times(await until_pong(ws)) == [t[2]]
        # 3 and 4 committed but their publish never came; 5 is published: healed, no gap
        await store.upsert(SID_1M, minutes[3:6], "ws")
        market.hub.publish_closed(SID_1M, minutes[5:6])
        healed = await until_pong(ws)
        assert closed_times(healed) == t[3:6]
        assert gaps(healed) == []
        # 6 and 7 are missing at the exchange (not in the store either): one gap, then 8
        await store.upsert(SID_1M, minutes[8:9], "ws")
        market.hub.publish_closed(SID_1M, minutes[8:9])
        assert await until_pong(ws) == [
            {"type": "gap", "series_id": SID_1M, "expected_next_time": t[6], "actual_time": t[8]},
            {"type": "candles_batch", "series_id": SID_1M, "candles": [minutes[8].to_wire()]},
        ]
        # a late 6 is below the cursor now: never sent (the factor.rebuild tells about it)
        await store.upsert(SID_1M, minutes[6:7], "ws")
        market.hub.publish_closed(SID_1M, minutes[6:7])
        assert await until_pong(ws) == []
        assert market.hub.statistics().gaps_sent == 1
        assert metric(market.metrics, "tradecanvas_gaps_total") == 1.0


async def test_a_gap_after_the_client_cursor_is_reported_on_catch_up(store: CandleStore) -> None:
    minutes = real_candles()[:6]
    t = [c.candle_time for c in minutes]
    await store.upsert(SID_1M, [minutes[0], minutes[1], minutes[4], minutes[5]], "ws")
    async with running_market(store) as market, connect(market.port) as ws:
        # the client's cursor is a stored candle: the hole after it is real
        await send(ws, subscribe_msg(SID_1M, since=t[1], batch=True))
        messages = await until_pong(ws)
        assert gaps(messages) == [(t[2], t[4])]
        assert closed_times(messages) == [t[4], t[5]]
        # a cursor the store does not have (before its history): no gap, just the candles
        await send(ws, subscribe_msg(SID_1M, since=t[0] - 3600, batch=True))
        messages = await until_pong(ws)
        assert gaps(messages) == [(t[2], t[4])]  # the hole inside the history is still one
        assert closed_times(messages) == [t[0], t[1], t[4], t[5]]


async def test_derived_series_holes_use_their_own_timeframe(store: CandleStore) -> None:
    fives = real_candles("5m")[:4]
    await store.upsert(SID_5M, fives[:2], "derived")
    async with running_market(store) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_5M, since=fives[0].candle_time, batch=True))
        assert closed_times(await until_pong(ws)) == [fives[1].candle_time]
        await store.upsert(SID_5M, fives[3:], "derived")
        market.hub.publish_closed(SID_5M, fives[3:])
        messages = await until_pong(ws)
        assert gaps(messages) == [(fives[2].candle_time, fives[3].candle_time)]


# --- forming, system, coalescing -------------------------------------------------------


async def test_coalescing_one_message_per_series_per_wake_up(store: CandleStore) -> None:
    minutes = real_candles()[:8]
    t = [c.candle_time for c in minutes]
    await store.upsert(SID_1M, minutes, "ws")
    async with running_market(store) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_1M, since=t[0], batch=True))
        assert closed_times(await until_pong(ws)) == t[1:]
        more = list(flat_minutes(t[7] + 60, 6, price="108000"))
        await store.upsert(SID_1M, more, "ws")
        # six publishes and three forming updates without a checkpoint: one wake-up
        for c in more:
            market.hub.publish_closed(SID_1M, [c])
        later = more[-1].candle_time + 60
        forming = [attrs.evolve(more[-1], candle_time=later, close=Decimal(p)) for p in (1, 2, 3)]
        for f in forming:
            market.hub.publish_forming(SID_1M, f)
        event = SystemEvent(SID_1M, "revision", t[3], t[3])
        market.hub.publish_system(event)
        assert await until_pong(ws) == [
            {"type": "candles_batch", "series_id": SID_1M, "candles": [c.to_wire() for c in more]},
            {"type": "candle_forming", "series_id": SID_1M, "candle": forming[-1].to_wire()},
            event.to_wire(),
        ]


async def test_forming_is_sent_only_above_the_cursor(store: CandleStore) -> None:
    minutes = real_candles()[:4]
    await store.upsert(SID_1M, minutes, "ws")
    async with running_market(store) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_1M, since=minutes[0].candle_time))
        assert len(await until_pong(ws)) == 3
        market.hub.publish_forming(SID_1M, minutes[3])  # at the cursor: already closed
        assert await until_pong(ws) == []
        nxt = attrs.evolve(minutes[3], candle_time=minutes[3].candle_time + 60)
        await store.upsert(SID_1M, [nxt], "ws")
        # the close of that minute overtakes its still queued forming update
        market.hub.publish_forming(SID_1M, nxt)
        market.hub.publish_closed(SID_1M, [nxt])
        assert [m["type"] for m in await until_pong(ws)] == ["candle_closed"]


async def test_system_messages_go_to_that_series_only_after_its_candles(
    store: CandleStore,
) -> None:
    minutes = real_candles()[:5]
    fives = real_candles("5m")[:1]
    store_times = [c.candle_time for c in minutes]
    async with (
        running_market(store) as market,
        connect(market.port) as ws_1m,
        connect(market.port) as ws_5m,
    ):
        await send(ws_1m, subscribe_msg(SID_1M, batch=True))
        await send(ws_5m, subscribe_msg(SID_5M, batch=True))
        assert await until_pong(ws_1m) == [] and await until_pong(ws_5m) == []
        pipeline = IngestPipeline(store, market.hub, [Timeframe.parse("5m")], "test")
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes, "ws"))
        assert pipeline.publish(result, best_effort=False) == 0
        one = await until_pong(ws_1m)
        assert [m["type"] for m in one] == ["candles_batch", "system"]
        assert closed_times(one) == store_times
        assert one[1]["data"]["reason"] == "new_series"
        five = await until_pong(ws_5m)
        assert [m["type"] for m in five] == ["candles_batch", "system"]
        assert five[0]["candles"] == [fives[0].to_wire()]  # derived exactly like Binance's
        assert five[1]["series_id"] == SID_5M


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
)
async def test_subscribing_while_candles_flow_is_exactly_once_and_contiguous(
    history: int,
    since_choice: str,
    batch: bool,
    queue_max: int,
    catchup_limit: int,
    groups: list[list[tuple[str, int]]],
    tail: list[tuple[str, int]],
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


# --- slow consumers -------------------------------------------------------------------


async def test_a_lagging_subscriber_drops_forming_then_heals_from_the_store(
    store: CandleStore,
) -> None:
    minutes = list(flat_minutes(T0, 40, price="108000"))
    await store.upsert(SID_1M, minutes[:2], "ws")
    async with running_market(store, queue_max=4) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_1M, since=T0, batch=True))
        assert closed_times(await until_pong(ws)) == [minutes[1].candle_time]
        await store.upsert(SID_1M, minutes[2:], "ws")
        # a burst the queue cannot hold, published without a checkpoint in between
        market.hub.publish_forming(SID_1M, minutes[3])
        for c in minutes[2:]:
            market.hub.publish_closed(SID_1M, [c])
        statistics = market.hub.statistics()
        assert statistics.forming_dropped == 1
        # the four that fitted are dropped too when it starts lagging: the store has them
        assert statistics.closed_dropped_for_lag == 40 - 2
        assert statistics.lagging_subscribers == 1
        messages = await until_pong(ws)
        assert closed_times(messages) == [c.candle_time for c in minutes[1:]][1:]
        assert gaps(messages) == []
        assert market.hub.statistics().lagging_subscribers == 0
        # healed: live again
        nxt = next(iter(flat_minutes(minutes[-1].candle_time + 60, 1)))
        await store.upsert(SID_1M, [nxt], "ws")
        market.hub.publish_closed(SID_1M, [nxt])
        assert closed_times(await until_pong(ws)) == [nxt.candle_time]


async def test_unsubscribing_from_the_lagging_series_ends_the_lag(store: CandleStore) -> None:
    minutes = list(flat_minutes(T0, 10))
    await store.upsert(SID_1M, minutes, "ws")
    async with running_market(store, queue_max=2) as market, connect(market.port) as ws:
        await send(ws, subscribe_msg(SID_1M, since=T0 + 60 * 9))
        await send(ws, subscribe_msg(SID_5M))
        assert await until_pong(ws) == []
        (subscriber,) = market.hub.subscribers()
        for c in minutes:  # below the cursor: nothing to do
            market.hub.publish_closed(SID_1M, [c])
        assert not subscriber.statistics().lagging
        more = list(flat_minutes(T0 + 600, 3))
        await store.upsert(SID_1M, more, "ws")
        for c in more:
            market.hub.publish_closed(SID_1M, [c])
        assert subscriber.statistics().lagging
        assert subscriber.lag_scope.deadline < float("inf")
        market.hub.unsubscribe(subscriber, SERIES_1M)
        # nothing left to heal: no 4008 coming for it
        assert not subscriber.statistics().lagging
        assert subscriber.lag_scope.deadline == float("inf")
        assert await until_pong(ws) == []


async def test_a_never_reading_subscriber_is_closed_4008_and_a_healthy_one_gets_everything(
    store: CandleStore,
) -> None:
    # ~2 MB of batches: far more than the stalled client's socket buffers take
    minutes = list(flat_minutes(T0, 20_000, price="108123.45"))
    async with (
        running_market(store, send_timeout_s=0.2, catchup_limit=100) as market,
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
        assert market.hub.statistics().slow_consumers_closed == 1
        assert (
            metric(
                market.metrics, 'tradecanvas_subscriber_disconnects_total{reason="slow_consumer"}'
            )
            == 1.0
        )
        # reading again now, it finds whole messages and then the 4008 close frame
        assert await close_code_of(stalled) == 4008


async def test_a_subscriber_lagging_too_long_is_closed_4008(store: CandleStore) -> None:
    history = list(flat_minutes(T0, 20_000, price="108123.45"))
    await store.upsert(SID_1M, history, "ws")
    live = list(flat_minutes(T0 + 60 * len(history), 20))
    async with (
        running_market(
            store, queue_max=8, send_timeout_s=60, catchup_limit=100, max_lag_s=0.2
        ) as market,
        connect(market.port, receive_buffer=4096, message_queue_size=1) as stalled,
    ):
        # its catch-up (~2 MB) backs up; the live candles overflow its queue: lagging
        await send(stalled, subscribe_msg(SID_1M, since=T0 - 60, batch=True))
        await market.hub.wait_subscribers(1)
        await store.upsert(SID_1M, live, "ws")
        for c in live:
            assert market.hub.publish_closed(SID_1M, [c]) == []  # lagging is not a failure
        assert market.hub.statistics().lagging_subscribers == 1
        with trio.fail_after(10):
            await market.hub.wait_subscribers(0)
        assert market.hub.statistics().slow_consumers_closed == 1
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
        assert market.hub.statistics().failed_unreported == 1
        pipeline = IngestPipeline(store, market.hub, [Timeframe.parse("5m")], "test")
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[:5], "ws"))
        assert pipeline.publish(result, best_effort=True) == 1  # the 1m step, reported once
        result = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[5:], "ws"))
        assert pipeline.publish(result, best_effort=True) == 0
        messages = await until_pong(healthy)
        assert closed_times(messages, SID_1M) == [c.candle_time for c in minutes]
        assert closed_times(messages, SID_5M) == [c.candle_time for c in real_candles("5m")[:2]]
        assert market.hub.statistics().failed_unreported == 0
        assert (
            metric(
                market.metrics, 'tradecanvas_subscriber_disconnects_total{reason="connection_lost"}'
            )
            == 1.0
        )


async def test_a_strict_publish_raises_and_healthy_subscribers_still_get_every_candle(
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
        with pytest.raises(PublishError) as info:
            pipeline.publish(result, best_effort=False)
        assert "delivery" in str(info.value) or "connection lost" in str(info.value)
        # the failing 1m step still delivered to the healthy one, and the steps after it
        # (the 5m series, the new_series events) ran before the error was raised
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
            victims = [s for s in market.hub.subscribers() if s.statistics().messages_sent == 4]
            assert len(victims) == 2
            target = victims[-1]  # attached second
            ws = target.socket
            assert isinstance(ws, trio_websocket.WebSocketConnection)
            stream = ws._stream
            assert isinstance(stream, FrameSafeStream)
            stream.inner.socket.shutdown(socket.SHUT_WR)
            nxt = next(iter(flat_minutes(minutes[-1].candle_time + 60, 1)))
            await store.upsert(SID_1M, [nxt], "ws")
            assert market.hub.publish_closed(SID_1M, [nxt]) == []
            await market.hub.wait_subscribers(1)
            # the send failed; its reader may notice the aborted connection first
            assert target.disconnect_reason in ("send_failed", "connection_lost")
            assert market.hub.statistics().failed_unreported == 1
            # the next publish reports it once
            later = next(iter(flat_minutes(nxt.candle_time + 60, 1)))
            await store.upsert(SID_1M, [later], "ws")
            failures = market.hub.publish_closed(SID_1M, [later])
            assert len(failures) == 1 and target.peer in failures[0]
        assert closed_times(await until_pong(healthy)) == [nxt.candle_time, later.candle_time]


# --- scale ----------------------------------------------------------------------------


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
