"""Publisher → Redis → feed with real Redis, a real store and the real pipeline: every closed
candle once and in order, events once, holes filled from the store, Redis restarts survived,
forming at most once and never before the closes it follows."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.bus.conftest import PrivateRedis
from tests.bus.rig import (
    BTC,
    BTC1,
    BTC5,
    T0,
    WAIT_S,
    RecordingSink,
    commit_and_publish,
    edge_feed,
    minutes,
    open_pipeline,
    publishing,
    stored,
    stored_events,
)
from tradecanvas.bus.feed import FeedSettings
from tradecanvas.bus.ids import StreamId, StreamKeys, candle_entry_id
from tradecanvas.bus.publisher import BusPublisher, PublisherSettings
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.bus.replies import (
    carried_entries,
    entry_field,
    notice_of,
    notices_top,
    xread_entries,
)
from tradecanvas.errors import WireError
from tradecanvas.model import Candle
from tradecanvas.pipeline.commit import IngestBatch
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.wire.bus import CANDLE_FIELD, encode_candle


def _settings(keys: StreamKeys, **kw: int) -> PublisherSettings:
    return PublisherSettings(keys=keys, **kw)  # type: ignore[arg-type]


async def test_publish_to_feed_in_order_exactly_once(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    sink = RecordingSink()
    async with publishing(redis_url, tmp_path, _settings(keys, batch_max=50)) as bus:
        await bus.start_feed(redis_url, keys, sink, series={BTC1: None, BTC5: None})
        # several commits, then a backfill below the head: refused on the streams, as
        # a single-process subscriber past it drops it; the factor.rebuild event says it
        pipeline, publisher = bus.pipeline, bus.publisher
        history = minutes(T0, 120)
        for start in range(0, 100, 17):
            await commit_and_publish(pipeline, history[start + 5 : start + 22])
        await commit_and_publish(pipeline, history[:5])
        await publisher.wait_drained()
        want1 = [c for c in await stored(pipeline.store, BTC1) if c.candle_time >= T0 + 300]
        want5 = [c for c in await stored(pipeline.store, BTC5) if c.candle_time >= T0 + 300]
        events = await stored_events(pipeline.store)
        await sink.wait_for(
            lambda: (
                sink.times(BTC1)[-1:] == [want1[-1].candle_time]
                and sink.times(BTC5)[-1:] == [want5[-1].candle_time]
                and [e.event_id for e in sink.events][-1:] == events[-1:]
            )
        )
        logged = await pipeline.store.events_after(0, limit=1000)
    assert sink.closed[BTC1] == want1
    assert sink.closed[BTC5] == want5
    assert [e.event_id for e in sink.events] == events
    # what the events stream carried is what the event log holds (a hole's fill)
    assert sink.events == [SystemEvent.from_stored(e) for e in logged]
    stats = publisher.statistics()
    # the five backfilled minutes and the 5m bar they completed
    assert stats.outbox.already_published == 6 and stats.outbox.appended > 0
    assert publisher.health().connected and publisher.health().backlog == 0


async def test_a_duplicate_or_older_id_is_refused_and_counts_as_published(
    redis_url: str, keys: StreamKeys
) -> None:
    history = minutes(T0, 8)
    first = BusPublisher(redis_url, _settings(keys))
    # a second ingest node (or the same one restarted) knows nothing of what the first sent
    second = BusPublisher(redis_url, _settings(keys))
    async with trio.open_nursery() as nursery:
        await nursery.start(first.run)
        await nursery.start(second.run)
        first.publish_closed(BTC1, history[:5])
        await first.wait_drained()
        second.publish_closed(BTC1, history[2:])
        second.publish_closed(BTC1, history[:1])  # older than the top
        await second.wait_drained()
        nursery.cancel_scope.cancel()
    stats = second.statistics().outbox
    assert (stats.appended, stats.already_published, stats.failed) == (3, 4, 0)
    async with open_redis(redis_url) as client:
        entries = await client.xrange(keys.series(BTC1))
    assert [e.identifier for e in entries] == [
        f"{c.candle_time * 1000}-0".encode() for c in history
    ]


async def test_a_hole_trimmed_away_is_filled_from_the_store(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    # MAXLEN ~ 10 trims whole nodes (100 entries each by default): 600 bars leave ~100
    sink = RecordingSink()
    async with publishing(redis_url, tmp_path, _settings(keys, maxlen=10)) as bus:
        history = minutes(T0, 600)
        await commit_and_publish(bus.pipeline, history[:10])
        await bus.publisher.wait_drained()
        # the edge has delivered up to the 10th bar, then is away while 590 more come
        cursor = history[9].candle_time
        await commit_and_publish(bus.pipeline, history[10:])
        await bus.publisher.wait_drained()
        async with open_redis(redis_url) as client:
            first = (await client.xrange(keys.series(BTC1), count=1))[0]
        oldest = StreamId.parse(first.identifier)
        assert oldest > candle_entry_id(history[10].candle_time)
        feed = edge_feed(redis_url, bus.pipeline.store, keys, series={BTC1: cursor})
        await bus.nursery.start(feed.run, sink)
        await sink.wait_for(lambda: sink.times(BTC1)[-1:] == [history[-1].candle_time])
    assert sink.closed[BTC1] == history[10:]


async def test_a_hole_found_while_reading_is_filled_before_the_candles_after_it(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    """A hole in the middle of what the feed reads (an entry dropped from a full outbox, a
    malformed one, on the stream or in a notice): the store's bars come first, then the
    stream's, in order."""
    sink = RecordingSink()
    history = minutes(T0, 30)
    async with publishing(redis_url, tmp_path, _settings(keys)) as bus:
        feed = await bus.start_feed(redis_url, keys, sink, series={BTC1: history[0].candle_time})
        # committed but never published (the ingest died in between), then on the stream a
        # malformed entry where bar 12 should be and bar 13, with a notice naming the stream
        # but carrying nothing (as an older writer's), so that the feed reads the stream
        await bus.pipeline.run(IngestBatch.of(BTC, history[:14], "ws"))
        async with open_redis(redis_url) as client:
            for bar, payload in ((history[12], b"garbage"), (history[13], b"")):
                await client.xadd(
                    keys.series(BTC1),
                    {CANDLE_FIELD: payload or encode_candle(bar)},
                    identifier=f"{bar.candle_time * 1000}-0",
                )
            number = await client.incr(keys.batches_count)
            await client.xadd(keys.batches, {b"n": str(number), b"keys": keys.series(BTC1)})
        await sink.wait_for(lambda: sink.times(BTC1)[-1:] == [history[13].candle_time])
        assert feed.statistics().malformed == 1
        # bar 14 committed, and a notice that carries it malformed (not on the stream), then
        # the rest published: the edge fills bar 14 from the store before the rest
        await bus.pipeline.run(IngestBatch.of(BTC, history[14:15], "ws"))
        entry = f"{keys.series(BTC1)}\n{history[14].candle_time * 1000}-0\n3\n[1]"
        async with open_redis(redis_url) as client:
            number = await client.incr(keys.batches_count)
            await client.xadd(
                keys.batches, {b"n": str(number), b"keys": keys.series(BTC1), b"entries": entry}
            )
        await commit_and_publish(bus.pipeline, history[15:])
        await bus.publisher.wait_drained()
        await sink.wait_for(lambda: sink.times(BTC1)[-1:] == [history[-1].candle_time])
    assert sink.closed[BTC1] == history[1:]
    assert feed.statistics().malformed == 2


async def test_a_read_reaches_the_hub_corked_shortest_timeframe_first(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    """Corked, the Hub writes each subscriber's share of a block in one write: a read's
    streams go out by timeframe, shortest first, one corked block each (the events with the
    last), whatever their order in the notice; a hole's store read is made with the cork
    let go, after what came before it went out."""
    sink = RecordingSink()
    history = minutes(T0, 8)
    async with publishing(redis_url, tmp_path, _settings(keys)) as bus:
        feed = await bus.start_feed(redis_url, keys, sink, series={BTC1: None, BTC5: None})
        # one commit, one batch: five 1m bars, the 5m bar the fifth completes, the events
        await commit_and_publish(bus.pipeline, history[:5])
        await bus.publisher.wait_drained()
        await sink.wait_for(lambda: sink.times(BTC5) == [T0])
        first, second = [b for b in sink.blocks if b]
        assert first == [("closed", BTC1, [c.candle_time for c in history[:5]])]
        assert second[0] == ("closed", BTC5, [T0])
        assert {kind for kind, _, _ in second[1:]} == {"system"}
        assert first + second == sink.log
        # committed, then one notice carrying a 5m bar, then 1m bars 5 and 7 and bar 6
        # malformed: 5 goes out, the cork is let go, 6 comes from the store, 7, then the 5m
        await bus.pipeline.run(IngestBatch.of(BTC, history[5:], "ws"))
        bar5 = minutes(T0 + 300, 1)[0]
        carried = [
            (BTC5, bar5.candle_time, encode_candle(bar5)),
            *((BTC1, c.candle_time, encode_candle(c)) for c in history[5:]),
        ]
        carried[2] = (BTC1, history[6].candle_time, b"[1]")
        entries = b"\n".join(
            b"%s\n%d-0\n%d\n%s" % (keys.series(sid).encode(), t * 1000, len(p), p)
            for sid, t, p in carried
        )
        named = f"{keys.series(BTC5)}\n{keys.series(BTC1)}"
        async with open_redis(redis_url) as client:
            number = await client.incr(keys.batches_count)
            await client.xadd(
                keys.batches, {b"n": str(number), b"keys": named, b"entries": entries}
            )
        await sink.wait_for(lambda: sink.times(BTC5)[-1:] == [bar5.candle_time])
    assert sink.times(BTC1) == [c.candle_time for c in history]
    assert feed.statistics().filled_candles == 1 and sink.reads_while_held == 0
    assert [b for b in sink.blocks if b][2:] == [
        [("closed", BTC1, [history[5].candle_time])],
        [("closed", BTC1, [history[7].candle_time])],
        [("closed", BTC5, [bar5.candle_time])],
    ]
    assert not sink.held


async def test_a_redis_restart_loses_nothing_and_doubles_nothing(
    private_redis: PrivateRedis, tmp_path: Path
) -> None:
    await private_redis.start()
    keys = StreamKeys("restart:")
    url = private_redis.url
    sink = RecordingSink()
    history = minutes(T0, 90)
    async with publishing(url, tmp_path, _settings(keys, batch_max=20)) as bus:
        pipeline, publisher = bus.pipeline, bus.publisher
        feed = await bus.start_feed(url, keys, sink, series={BTC1: T0 - 60, BTC5: T0 - 300})
        await commit_and_publish(pipeline, history[:30])
        await sink.wait_for(lambda: sink.times(BTC1)[-1:] == [history[29].candle_time])
        # Redis goes away: commits go on, the publisher holds them
        private_redis.stop()
        await commit_and_publish(pipeline, history[30:60])
        with trio.fail_after(WAIT_S):
            await publisher.wait_connected(False)
            await feed.wait_connected(False)
        assert publisher.health().backlog > 0
        # back, empty (nothing kept on disk): the held ones and new ones go out
        await private_redis.start()
        await commit_and_publish(pipeline, history[60:])
        await publisher.wait_drained()
        want5 = await stored(pipeline.store, BTC5)
        await sink.wait_for(
            lambda: (
                sink.times(BTC1)[-1:] == [history[-1].candle_time]
                and sink.times(BTC5)[-1:] == [want5[-1].candle_time]
            )
        )
        assert publisher.health().connected and publisher.statistics().reconnects >= 1
        assert publisher.health().last_error is not None
        with trio.fail_after(WAIT_S):
            await feed.wait_connected()
    assert sink.closed[BTC1] == history
    assert sink.closed[BTC5] == want5
    assert feed.statistics().reconnects >= 1


async def test_forming_goes_at_most_once_and_after_the_closes_before_it(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    sink = RecordingSink()
    history = minutes(T0, 10)
    async with publishing(redis_url, tmp_path, _settings(keys)) as bus:
        publisher = bus.publisher
        await bus.start_feed(redis_url, keys, sink, series={BTC1: T0 - 60})
        await commit_and_publish(bus.pipeline, history[:3])
        publisher.publish_forming(BTC1, history[3])
        await sink.wait_for(lambda: len(sink.forming) == 1)
        # bar 4 and 5 are owed: the forming bar 6 waits for them
        publisher.publish_forming(BTC1, history[6])
        await publisher.wait_drained()
        await commit_and_publish(bus.pipeline, history[3:6])
        await sink.wait_for(lambda: len(sink.forming) == 2)
    assert sink.forming == [(BTC1, history[3]), (BTC1, history[6])]
    second = sink.log.index(("forming", BTC1, history[6].candle_time))
    closes_before = [
        t for kind, _, ts in sink.log[:second] if kind == "closed" and isinstance(ts, list)
        for t in ts
    ]  # fmt: skip
    assert closes_before[-1] == history[5].candle_time
    assert publisher.statistics().outbox.forming_sent == 2


async def _xadd_without_notice(
    url: str, keys: StreamKeys, series_id: str, bars: list[Candle]
) -> None:
    """``bars`` on the series' stream as a writer that sends no batch notice puts them."""
    async with open_redis(url) as client:
        for bar in bars:
            await client.xadd(
                keys.series(series_id),
                {CANDLE_FIELD: encode_candle(bar)},
                identifier=f"{bar.candle_time * 1000}-0",
            )


async def test_the_feed_reads_the_streams_a_notice_names_and_all_after_missed_notices(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    """An edge waits on the batch notices and reads only the streams they name; when a
    notice's number shows that some were missed, it reads every stream once."""
    eth = "binance:futures:ETH/USDT:1m"
    sink = RecordingSink()
    history = minutes(T0, 6)
    async with publishing(redis_url, tmp_path, _settings(keys)) as bus:
        # no read for want of notices within the test (block_ms): only notices drive it
        settings = FeedSettings(keys=keys, block_ms=600_000)
        series: dict[str, int | None] = {BTC1: T0 - 60, eth: T0 - 60}
        await bus.start_feed(redis_url, keys, sink, series=series, settings=settings)
        await commit_and_publish(bus.pipeline, history[:2])
        await sink.wait_for(lambda: sink.times(BTC1) == [T0, T0 + 60])
        # ETH's bar appended by a writer that sends no notice, then a notice for BTC
        await _xadd_without_notice(redis_url, keys, eth, history[:1])
        await commit_and_publish(bus.pipeline, history[2:3])
        await sink.wait_for(lambda: sink.times(BTC1)[-1:] == [T0 + 120])
        assert eth not in sink.closed  # not named by any notice: not read
        # notices missed (as if trimmed away): the next one's number jumps
        async with open_redis(redis_url) as client:
            await client.incrby(keys.batches_count, 5)
        await commit_and_publish(bus.pipeline, history[3:4])
        await sink.wait_for(lambda: sink.times(eth) == [T0])
        assert sink.times(BTC1) == [c.candle_time for c in history[:4]]


async def test_a_writer_that_sends_no_notice_is_read_within_block_ms(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    """An XADD without a notice (an ingest of an older version) reaches the edge when no
    notice came for ``block_ms``: then every stream is read once."""
    pipeline = await open_pipeline(tmp_path, BusPublisher(redis_url, _settings(keys)))
    sink = RecordingSink()
    history = minutes(T0, 3)
    try:
        async with trio.open_nursery() as nursery:
            feed = edge_feed(redis_url, pipeline.store, keys, series={BTC1: T0 - 60})
            await nursery.start(feed.run, sink)
            await feed.wait_ready()
            await _xadd_without_notice(redis_url, keys, BTC1, history)
            await sink.wait_for(lambda: sink.times(BTC1) == [c.candle_time for c in history])
            nursery.cancel_scope.cancel()
    finally:
        await pipeline.store.aclose()


def test_an_xread_reply_is_read_as_redis_sends_it() -> None:
    """The feed takes XREAD's reply without coredis's conversion: RESP3's map or RESP2's
    list, an entry's fields in any order; anything else is a WireError (a malformed entry
    is then read past and filled from the store)."""
    entry = [b"60000-0", [b"x", b"1", CANDLE_FIELD, b"[...]"]]
    assert xread_entries(None) == {}
    assert xread_entries({b"k": [entry]}) == xread_entries([[b"k", [entry]]]) == {b"k": [entry]}
    assert entry_field(entry, CANDLE_FIELD) == b"[...]"
    bad_replies: list[object] = [b"OK", [[b"k"]], {b"k": b"entries"}, {"k": []}]
    for bad_reply in bad_replies:
        with pytest.raises(WireError):
            xread_entries(bad_reply)
    for bad_entry in ([b"60000-0"], [b"60000-0", [b"x", b"1"]], [b"60000-0", b"c"]):
        with pytest.raises(WireError):
            entry_field(bad_entry, CANDLE_FIELD)


def test_a_batch_notice_and_where_the_notices_stand_are_read_or_refused() -> None:
    assert notices_top([b"1700000000000-3", b"42"]) == (StreamId(1700000000000, 3), 42)
    assert notices_top([b"0-0", b"0"]) == (StreamId(0, 0), 0)
    for bad in (None, [b"0-0"], [b"0-0", None], [b"x", b"1"], [b"0-0", b"-1"]):
        with pytest.raises(WireError):
            notices_top(bad)
    notice = [b"1700000000000-0", [b"n", b"7", b"keys", b"p:candles:a\np:events"]]
    assert notice_of(notice) == (7, [b"p:candles:a", b"p:events"], None)
    carrying = [b"1-0", [b"n", b"8", b"keys", b"k", b"entries", b"k\n60000-0\n4\n[\n1]"]]
    assert notice_of(carrying) == (8, [b"k"], [(b"k", b"60000-0", b"[\n1]")])
    bad_notices: list[list[object]] = [
        [b"1-0", [b"n", b"x", b"keys", b"k"]],
        [b"1-0", [b"n", b"7"]],
        [b"1-0", [b"n", b"7", b"keys", b"k", b"entries", [b"k"]]],
    ]
    for bad_notice in bad_notices:
        with pytest.raises(WireError):
            notice_of(bad_notice)
    for bad_entries in (b"k", b"k\n1-0", b"k\n1-0\nx\n", b"k\n1-0\n5\nabc", b"k\n1-0\n1\nab"):
        with pytest.raises(WireError):
            carried_entries(bad_entries)


@given(
    st.lists(
        st.tuples(
            st.binary(min_size=1).filter(lambda k: b"\n" not in k),
            st.builds(lambda ms, seq: f"{ms}-{seq}".encode(), st.integers(0), st.integers(0)),
            st.binary(),
        )
    )
)
def test_a_notice_s_entries_are_read_back_as_the_script_joins_them(
    entries: list[tuple[bytes, bytes, bytes]],
) -> None:
    """Whatever the payloads hold (newlines included), the entries come back as written:
    the publisher's script joins stream, ID, payload length and payload with newlines."""
    text = b"\n".join(p for k, i, v in entries for p in (k, i, str(len(v)).encode(), v))
    assert carried_entries(text) == entries
