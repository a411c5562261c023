"""An ingest node taking the lease over starts its event-log tail where the events stream
stands (``serve/event_tail.py`` with the bus publisher as its sink), on the real Redis: what
the previous holder published is not read and sent again; what it committed and did not
publish yet, and what comes after, is published once. A stream whose last id the log does
not hold (a foreign one) is not trusted: the tail starts where it would have."""

from __future__ import annotations

import trio

from tests.bus.rig import BTC1, WAIT_S, run_closed
from tradecanvas.bus.ids import StreamId, StreamKeys
from tradecanvas.bus.publisher import BusPublisher, PublisherSettings
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.event_tail import EventTail
from tradecanvas.store.interface import MarketStore, WriteTxn
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.bus import EVENT_FIELD


async def _log(store: MarketStore, count: int) -> list[int]:
    """``count`` events appended to the log (as another node or process does)."""

    def append(txn: WriteTxn) -> list[int]:
        data = {"reason": "backfill", "from_time": 0, "to_time": 60}
        return [txn.append_event(BTC1, "factor.rebuild", data, 0.0) for _ in range(count)]

    return await store.write(append)


async def _publish(url: str, keys: StreamKeys, store: MarketStore, ids: list[int]) -> None:
    """What the previous lease holder did: these events on the events stream."""
    stored = {e.event_id: e for e in await store.events_after(0, limit=1000)}
    publisher = BusPublisher(url, PublisherSettings(keys=keys))
    for event_id in ids:
        publisher.publish_system(SystemEvent.from_stored(stored[event_id]))
    await run_closed(publisher)


async def test_a_node_taking_over_does_not_publish_again_what_the_previous_holder_did(
    store: CandleStore, redis_url: str, keys: StreamKeys
) -> None:
    before = await _log(store, 2)  # the log when the standby started: its cursor
    published = await _log(store, 40)  # the holder's events, published
    unpublished = await _log(store, 3)  # committed; the holder died before publishing
    await _publish(redis_url, keys, store, before + published)
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    tail = EventTail(store, publisher, cursor=before[-1])
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        with trio.fail_after(WAIT_S):
            await nursery.start(tail.run)  # the lease is taken over: the tail starts
            await publisher.wait_drained()
        # only what the holder did not publish: nothing sent again, nothing refused
        stats = publisher.statistics().outbox
        assert (tail.published, stats.appended, stats.already_published) == (3, 3, 0)
        assert tail.cursor == unpublished[-1]
        # a stream the log holds is not ahead of it (bus/events_ahead.py)
        assert publisher.readiness(streams=True)["bus_events_match_store"] is True
        nursery.cancel_scope.cancel()
    async with open_redis(redis_url) as client:
        entries = await client.xrange(keys.events)
    ids = [StreamId.parse(e.identifier).ms for e in entries]
    assert ids == before + published + unpublished


async def test_a_stream_top_the_log_does_not_hold_is_not_trusted(
    store: CandleStore, redis_url: str, keys: StreamKeys
) -> None:
    before = await _log(store, 1)
    later = await _log(store, 2)
    async with open_redis(redis_url) as client:  # an id no event of the log has
        await client.xadd(keys.events, {EVENT_FIELD: b"{}"}, identifier="999-0")
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    assert await publisher.published_event_id() == 999
    tail = EventTail(store, publisher, cursor=before[-1])
    async with trio.open_nursery() as nursery:
        with trio.fail_after(WAIT_S):
            await nursery.start(tail.run)
        assert tail.published == 2 and tail.cursor == later[-1]
        nursery.cancel_scope.cancel()
