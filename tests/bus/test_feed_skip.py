"""An edge's feed passes over the closed candles of a series nobody on the edge follows (no
decode, no publish; the cursor moves past them by their IDs), and a client that subscribes
afterwards still gets every one of them once, in order, from the store: real Redis, the
real publisher and pipeline, the real Hub with recording connections."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import pytest
import trio

import tradecanvas.bus.feed as feed_module
from tests.bus.rig import (
    BTC,
    BTC1,
    BTC5,
    T0,
    WAIT_S,
    Publishing,
    RecordingSink,
    commit_and_publish,
    edge_feed,
    minutes,
    publishing,
)
from tests.serve.test_ws_server import closed_times
from tradecanvas.bus.feed import EdgeFeed
from tradecanvas.bus.ids import StreamId, StreamKeys, candle_entry_id
from tradecanvas.bus.publisher import PublisherSettings
from tradecanvas.bus.replies import RawEntry, candle_of
from tradecanvas.model import Candle, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.hub import Hub
from tradecanvas.serve.subscriber import Subscriber
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.types import StoredEvent
from tradecanvas.wire.json import loads

FIVE: Final = BTC.with_timeframe(Timeframe.parse("5m"))
assert str(FIVE) == BTC5


def _times(candles: Sequence[Candle]) -> list[int]:
    return [c.candle_time for c in candles]


async def test_a_series_nobody_follows_is_not_decoded_yet_its_cursor_moves(
    redis_url: str, keys: StreamKeys, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    decoded: list[int] = []

    def counting(entry: RawEntry, entry_id: StreamId) -> Candle:
        got = candle_of(entry, entry_id)
        decoded.append(got.candle_time)
        return got

    monkeypatch.setattr(feed_module, "candle_of", counting)
    sink = RecordingSink(followed={BTC5})
    history = minutes(T0, 30)
    async with publishing(redis_url, tmp_path, PublisherSettings(keys=keys)) as bus:
        feed = await bus.start_feed(redis_url, keys, sink, series={BTC1: None, BTC5: None})
        await commit_and_publish(bus.pipeline, history[:20])
        # the 1m closes go before the 5m bars they complete (shortest timeframe first)
        await sink.wait_for(lambda: sink.times(BTC5)[-1:] == [T0 + 900])
        assert decoded == sink.times(BTC5) == [T0, T0 + 300, T0 + 600, T0 + 900]
        assert BTC1 not in sink.closed
        assert feed.cursors.cursor(BTC1) == history[19].candle_time
        assert feed.cursors.read_position(BTC1) == candle_entry_id(history[19].candle_time)
        assert feed.statistics().passed_over == 20
        # followed from now on: decoded and published, and no hole is owed before them
        sink.followed = None
        await commit_and_publish(bus.pipeline, history[20:30])
        await sink.wait_for(lambda: sink.times(BTC5)[-1:] == [T0 + 1500])
    assert sink.times(BTC1) == _times(history[20:30])
    stats = feed.statistics()
    assert (stats.passed_over, stats.candle_gaps, stats.filled_candles) == (20, 0, 0)


# --- the real Hub -------------------------------------------------------------------------


class GatedReader:
    """The Hub's store reads; with ``gate`` (an Event not set yet) each read of the 1m series
    is made and then held until it is set, so candles committed meanwhile are not in it."""

    def __init__(self, store: MarketStore) -> None:
        self.store = store
        self.gate: trio.Event | None = None
        self.read = trio.Event()  # set by the first held read

    async def _held(self, series_id: str) -> None:
        if series_id == BTC1 and self.gate is not None:
            self.read.set()
            await self.gate.wait()

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        got = await self.store.tail(series_id, limit)
        await self._held(series_id)
        return got

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        got = await self.store.since(series_id, since, limit)
        await self._held(series_id)
        return got

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = 1000
    ) -> list[StoredEvent]:
        return await self.store.events_after(after, series_ids, limit)

    async def events_pruned_upto(self) -> int:
        return await self.store.events_pruned_upto()

    async def events_newest_id(self) -> int:
        return await self.store.events_newest_id()


class Connection:
    """A /ws/market connection on the Hub that records what it is sent (no socket)."""

    def __init__(self, hub: Hub, nursery: trio.Nursery, name: str) -> None:
        self.sent: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self.subscriber: Subscriber = hub.attach(self, peer=name, max_subscriptions=8)
        nursery.start_soon(self._publish_task, hub)

    async def _publish_task(self, hub: Hub) -> None:
        with self.subscriber.cancel_scope:
            await hub.run_publisher(self.subscriber)

    async def send_message(self, message: str) -> None:
        await trio.lowlevel.checkpoint()
        self.sent.append(loads(message))
        self._changed.set()
        self._changed = trio.Event()

    def times(self, series_id: str) -> list[int]:
        return closed_times(self.sent, series_id)

    async def until(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT_S):
            while not condition():
                await self._changed.wait()

    async def settled(self) -> None:
        """Until everything queued for it so far is sent (a pong queued after it came)."""
        pongs = self.sent.count({"type": "pong"})
        self.subscriber.send_control({"type": "pong"})
        await self.until(lambda: self.sent.count({"type": "pong"}) > pongs)


class FedHub:
    """The Hub as the feed sees it, telling which 5m bars the feed published: a read's 1m
    closes go before the 5m bars they complete (the tracer subscribes to 5m, so the feed
    publishes those)."""

    def __init__(self, reader: GatedReader | MarketStore) -> None:
        self.hub = Hub(
            reader,
            series=[BTC, FIVE],
            queue_max=1024,
            send_timeout_s=5.0,
            catchup_limit=5000,
            metrics=Metrics(),
        )
        self.fives: list[int] = []
        self._changed = trio.Event()

    def follows(self, series_id: str) -> bool:
        return self.hub.follows(series_id)

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        if series_id == BTC5:
            self.fives.extend(_times(candles))
            self._changed.set()
            self._changed = trio.Event()
        return self.hub.publish_closed(series_id, candles)

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        return self.hub.publish_system(event)

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        self.hub.publish_forming(series_id, candle)

    def corked(self) -> contextlib.AbstractContextManager[None]:
        return self.hub.corked()

    async def fed(self, five: int) -> None:
        """Until the feed has published the 5m bar ``five`` (and the 1m bars before it)."""
        with trio.fail_after(WAIT_S):
            while five not in self.fives:
                await self._changed.wait()


async def start_fed_hub(
    bus: Publishing, url: str, keys: StreamKeys, reader: GatedReader | MarketStore
) -> tuple[FedHub, EdgeFeed]:
    """A feed into a real Hub reading the store through ``reader``, started in ``bus``'s
    nursery and ready, and a tracer connection on the Hub subscribed to 5m (so the feed
    publishes the 5m bars :meth:`FedHub.fed` waits for)."""
    fed = FedHub(reader)
    feed = edge_feed(url, bus.pipeline.store, keys, series={BTC1: None, BTC5: None})
    await bus.nursery.start(feed.run, fed)
    await feed.wait_ready()
    tracer = Connection(fed.hub, bus.nursery, "tracer")
    fed.hub.subscribe(tracer.subscriber, FIVE, None, batch=True)
    return fed, feed


@pytest.mark.parametrize("since_earlier", [False, True], ids=["since_null", "since_earlier"])
async def test_a_late_subscriber_gets_the_candles_passed_over_once_in_order(
    redis_url: str, keys: StreamKeys, tmp_path: Path, since_earlier: bool
) -> None:
    history = minutes(T0, 40)
    async with publishing(redis_url, tmp_path, PublisherSettings(keys=keys)) as bus:
        reader = GatedReader(bus.pipeline.store)
        fed, feed = await start_fed_hub(bus, redis_url, keys, reader)
        hub = fed.hub
        await commit_and_publish(bus.pipeline, history[:20])
        await fed.fed(T0 + 900)
        assert feed.statistics().passed_over == 20
        assert feed.cursors.cursor(BTC1) == history[19].candle_time
        late = Connection(hub, bus.nursery, "late")
        reader.gate = trio.Event()
        since = history[4].candle_time if since_earlier else None
        hub.subscribe(late.subscriber, BTC, since, batch=since_earlier)
        with trio.fail_after(WAIT_S):
            await reader.read.wait()  # its catch-up read is made: history[:20] only
        # ten more arrive during its catch-up: followed now, decoded and published
        await commit_and_publish(bus.pipeline, history[20:30])
        await fed.fed(T0 + 1500)
        assert feed.statistics().passed_over == 20
        reader.gate.set()
        await commit_and_publish(bus.pipeline, history[30:40])
        await fed.fed(T0 + 2100)
        await late.settled()
    want = history[5:] if since_earlier else history
    assert late.times(BTC1) == _times(want)
    assert [m for m in late.sent if m["type"] == "gap"] == []
    wire = [c for m in late.sent if m["type"] == "candles_batch" for c in m["candles"]]
    wire += [m["candle"] for m in late.sent if m["type"] == "candle_closed"]
    assert sorted(wire, key=lambda c: c["candle_time"]) == [c.to_wire() for c in want]


@pytest.mark.parametrize("seed", range(6))
async def test_subscribers_coming_and_going_get_each_candle_once_in_order(
    redis_url: str, keys: StreamKeys, tmp_path: Path, seed: int
) -> None:
    """Random subscribes (since null, since a candle sent or published, since the last one
    this connection got), unsubscribes and publishes of a few bars, interleaved with the
    feed's reads: every connection gets the 1m bars once, in order, without a hole."""
    rng = random.Random(seed)
    history = minutes(T0, 400)
    published = 0
    async with publishing(redis_url, tmp_path, PublisherSettings(keys=keys)) as bus:
        fed, feed = await start_fed_hub(bus, redis_url, keys, bus.pipeline.store)
        hub = fed.hub

        async def publish(count: int) -> None:
            nonlocal published
            await commit_and_publish(bus.pipeline, history[published : published + count])
            published += count

        await publish(5)  # nobody follows 1m yet: passed over
        await fed.fed(T0)
        assert feed.statistics().passed_over == 5
        connections = [Connection(hub, bus.nursery, f"c{i}") for i in range(4)]
        # per connection: where its first subscription starts (the first bar it is owed)
        starts: dict[Connection, int] = {}
        subscribed: set[Connection] = set()
        for _ in range(60):
            op = rng.choice(["publish", "publish", "subscribe", "unsubscribe", "yield"])
            conn = rng.choice(connections)
            if op == "publish" and published < len(history) - 10:
                await publish(rng.randint(1, 4))
            elif op == "subscribe" and conn not in subscribed:
                await conn.settled()  # nothing of an earlier subscription still on its way
                got = conn.times(BTC1)
                if got:
                    since: int | None = got[-1]  # resumes where it stopped
                else:
                    since = rng.choice([None, T0 - 60, *_times(history[:published])])
                    starts[conn] = T0 if since is None else since + 60
                hub.subscribe(conn.subscriber, BTC, since, batch=rng.random() < 0.5)
                subscribed.add(conn)
            elif op == "unsubscribe" and conn in subscribed:
                assert hub.unsubscribe(conn.subscriber, BTC)
                subscribed.discard(conn)
            for _ in range(rng.randint(0, 3)):
                await trio.lowlevel.checkpoint()
        # up to a 5m boundary and at least one more bar: the tracer shows the last read
        await publish(5 + (-published) % 5)
        await fed.fed(T0 + 60 * (published - 5))
        for conn in connections:
            await conn.settled()
    last = history[published - 1].candle_time
    for conn in connections:
        got = conn.times(BTC1)
        assert [m for m in conn.sent if m["type"] == "gap"] == []
        if conn not in starts:
            assert got == []
            continue
        # once each, in order, none missing: one run of consecutive bars from its start
        assert got == list(range(starts[conn], starts[conn] + 60 * len(got), 60))
        if conn in subscribed:
            assert got[-1:] == [last]
        else:
            assert len(got) == 0 or got[-1] <= last
