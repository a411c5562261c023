"""BusPublisher with real Redis: draining by closing, an entry Redis will not take, events
after the candles of their commit even when a read is cut short, the events stream's holes."""

from __future__ import annotations

from pathlib import Path

import trio

from tests.bus.conftest import PrivateRedis
from tests.bus.rig import (
    BTC1,
    T0,
    RecordingSink,
    commit_and_publish,
    edge_feed,
    minutes,
    open_pipeline,
    run_closed,
    stored_events,
)
from tradecanvas.bus.feed import EdgeFeed, FeedSettings
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.publisher import BusPublisher, PublisherSettings
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.bus.replies import carried_entries
from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.wire.bus import CANDLE_FIELD


async def test_close_drains_the_outbox_and_ends_run(redis_url: str, keys: StreamKeys) -> None:
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys, batch_max=7))
    publisher.publish_closed(BTC1, minutes(T0, 50))  # queued before it runs
    await run_closed(publisher)
    async with open_redis(redis_url) as client:
        assert await client.xlen(keys.series(BTC1)) == 50
    assert publisher.statistics().batches == 8


async def test_an_entry_redis_refuses_otherwise_is_dropped_and_the_rest_go(
    redis_url: str, keys: StreamKeys
) -> None:
    broken = "binance:spot:ETH/USDT:1m"
    async with open_redis(redis_url) as client:
        await client.set(keys.series(broken), "not a stream")
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    publisher.publish_closed(broken, minutes(T0, 2))
    publisher.publish_closed(BTC1, minutes(T0, 3))
    publisher.publish_system(SystemEvent(BTC1, "new_series", T0, T0 + 120))  # no event_id
    await run_closed(publisher)
    stats = publisher.statistics()
    assert (stats.outbox.failed, stats.outbox.appended, stats.events_without_id) == (2, 3, 1)
    assert "WRONGTYPE" in str(publisher.health().last_error)


async def test_a_batch_whose_script_fails_as_a_whole_is_counted_as_failed(
    redis_url: str, keys: StreamKeys
) -> None:
    """The script refused as a whole (here its notice, on a key that is no stream): every
    entry of the batch counts as failed (edges fill them from the store), nothing is sent
    again, and the error is shown."""
    async with open_redis(redis_url) as client:
        await client.set(keys.batches, "not a stream")
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    publisher.publish_closed(BTC1, minutes(T0, 3))
    await run_closed(publisher)
    stats = publisher.statistics()
    assert (stats.outbox.failed, stats.outbox.appended, stats.batches) == (3, 0, 1)
    assert "wrong kind of value" in str(publisher.health().last_error)


async def test_events_wait_for_the_candles_of_their_commit_when_a_read_is_cut(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    pipeline = await open_pipeline(tmp_path, publisher)
    sink = RecordingSink()
    committed = trio.Event()
    resynced: set[str] = set()

    # the edge's start-up read of the store happens just before the commit (it finds
    # nothing); its first XREAD comes after the whole commit is on Redis
    async def fill_candles(series_id: str, after: int | None, before: int | None) -> list[Candle]:
        if series_id not in resynced:
            resynced.add(series_id)
            await committed.wait()
            return []
        got = await pipeline.store.since(series_id, -1 if after is None else after, 1000)
        return [c for c in got if before is None or c.candle_time < before]

    async def fill_events(after: int, before: int | None) -> list[SystemEvent]:
        if "events" not in resynced:
            resynced.add("events")
            return []
        got = await pipeline.store.events_after(after, limit=1000)
        return [SystemEvent.from_stored(e) for e in got]

    feed = EdgeFeed(
        redis_url,
        series={BTC1: T0 - 60},
        events_after=0,
        fill_candles=fill_candles,
        fill_events=fill_events,
        settings=FeedSettings(keys=keys, block_ms=200, count=5),
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            await nursery.start(feed.run, sink)
            await commit_and_publish(pipeline, minutes(T0, 40))  # new_series events too
            await publisher.wait_drained()
            committed.set()
            events = await stored_events(pipeline.store)
            await sink.wait_for(lambda: [e.event_id for e in sink.events] == events)
            nursery.cancel_scope.cancel()
        first_event = next(i for i, entry in enumerate(sink.log) if entry[0] == "system")
        delivered_before = [
            t for kind, _, ts in sink.log[:first_event] if kind == "closed" and isinstance(ts, list)
            for t in ts
        ]  # fmt: skip
        assert delivered_before == [T0 + 60 * i for i in range(40)]
        assert len([e for e in sink.log if e[0] == "closed"]) == 8  # 5 per read
        assert feed.statistics().filled_candles == 0
    finally:
        await pipeline.store.aclose()


async def test_a_hole_in_the_events_stream_is_filled_from_the_event_log(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys, events_maxlen=1))
    pipeline = await open_pipeline(tmp_path, publisher)
    sink = RecordingSink()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            # history, then backfills below the head: a rebuild event each, and the events
            # stream (MAXLEN ~ 1) loses the older ones once a node is full
            history = minutes(T0, 400)
            await commit_and_publish(pipeline, history[300:])
            for start in range(0, 300, 2):
                await commit_and_publish(pipeline, history[start : start + 1])
            await publisher.wait_drained()
            events = await stored_events(pipeline.store)
            async with open_redis(redis_url) as client:
                assert await client.xlen(keys.events) < len(events)
            feed = edge_feed(redis_url, pipeline.store, keys, series={BTC1: T0 + 399 * 60})
            await nursery.start(feed.run, sink)
            await sink.wait_for(lambda: [e.event_id for e in sink.events][-1:] == events[-1:])
            nursery.cancel_scope.cancel()
        assert [e.event_id for e in sink.events] == events
        assert sink.closed == {}
    finally:
        await pipeline.store.aclose()


async def test_started_without_redis_it_holds_a_bounded_backlog_and_edges_fill_the_rest(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    keys = StreamKeys("down:")
    url = private_redis.url  # nothing listens there yet
    publisher = BusPublisher(url, PublisherSettings(keys=keys, max_backlog=10))
    pipeline = await open_pipeline(tmp_path, publisher)
    sink = RecordingSink()
    history = minutes(T0, 30)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)  # started at once: ingest never waits on Redis
            await commit_and_publish(pipeline, history)  # 30 minutes and 6 bars of 5m
            assert not publisher.health().connected
            assert publisher.health().backlog == 10
            # 30 minutes, 6 bars of 5m and 2 new_series events: the oldest 28 are dropped
            assert publisher.statistics().outbox.dropped == 38 - 10
            await private_redis.start()
            await publisher.wait_drained()
            async with open_redis(url) as client:
                assert await client.xlen(keys.series(BTC1)) < 30
            feed = edge_feed(url, pipeline.store, keys, series={BTC1: T0 - 60})
            await nursery.start(feed.run, sink)
            await sink.wait_for(lambda: sink.times(BTC1)[-1:] == [history[-1].candle_time])
            nursery.cancel_scope.cancel()
        assert sink.closed[BTC1] == history
        assert publisher.statistics().reconnects >= 1
    finally:
        await pipeline.store.aclose()


async def test_each_batch_that_appends_leaves_one_numbered_notice_naming_its_streams(
    redis_url: str, keys: StreamKeys
) -> None:
    """What edges wait on: one notice per batch that appended anything, numbered 1, 2, …,
    naming each stream appended to once; a batch Redis refused entirely leaves none."""
    eth = "binance:futures:ETH/USDT:1m"
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        publisher.publish_closed(BTC1, minutes(T0, 3))
        publisher.publish_closed(eth, minutes(T0, 2))
        await publisher.wait_drained()
        publisher.publish_closed(BTC1, minutes(T0, 3))  # already published: refused
        await publisher.wait_drained()
        publisher.publish_closed(eth, minutes(T0 + 120, 1))
        await publisher.wait_drained()
        nursery.cancel_scope.cancel()
    async with open_redis(redis_url) as client:
        notices = await client.xrange(keys.batches)
        count = await client.get(keys.batches_count)
    assert [(n.field_values[b"n"], n.field_values[b"keys"]) for n in notices] == [
        (b"1", f"{keys.series(BTC1)}\n{keys.series(eth)}".encode()),
        (b"2", keys.series(eth).encode()),
    ]
    # each carries the entries its batch appended, as the streams hold them
    async with open_redis(redis_url) as client:
        held = {
            sid: [(e.identifier, e.field_values[CANDLE_FIELD]) for e in await client.xrange(
                keys.series(sid)
            )]
            for sid in (BTC1, eth)
        }  # fmt: skip
    carried = [n.field_values[b"entries"] for n in notices]
    assert [carried_entries(c) for c in carried if isinstance(c, bytes)] == [
        [(keys.series(BTC1).encode(), i, p) for i, p in held[BTC1]]
        + [(keys.series(eth).encode(), i, p) for i, p in held[eth][:2]],
        [(keys.series(eth).encode(), i, p) for i, p in held[eth][2:]],
    ]
    assert count == b"2"
    assert publisher.statistics().outbox.already_published == 3
