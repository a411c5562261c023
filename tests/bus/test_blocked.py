"""A stream blocked by an ID no tradecanvas writer made (``bus/refusals.py``), on the real
Redis: the publisher tells it from *already published*, says so once at ERROR, counts it and
shows it on the ingest's /readyz; after the operator deletes the stream the series goes on
and an edge gets every candle once, the blocked ones from the store."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio

from tests.bus.conftest import PrivateRedis
from tests.bus.rig import (
    BTC1,
    T0,
    WAIT_S,
    RecordingSink,
    commit_and_publish,
    minutes,
    publishing,
    stored,
)
from tradecanvas.bus.ids import StreamId, StreamKeys
from tradecanvas.bus.publisher import BusPublisher, PublisherSettings
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.bus.roles import stream_keys
from tradecanvas.daemon import market_runtime_builder
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.wire.bus import CANDLE_FIELD, EVENT_FIELD, MAX_PAYLOAD_BYTES, encode_candle

FUTURE = "99999999999999-0"  # the year 5138


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def _drained(publisher: BusPublisher) -> None:
    with trio.fail_after(WAIT_S):
        await publisher.wait_drained()


async def test_a_foreign_top_blocks_loudly_and_the_series_resumes_once_the_stream_is_deleted(
    redis_url: str, keys: StreamKeys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    history = minutes(T0, 12)
    stream = keys.series(BTC1)
    sink = RecordingSink()
    caplog.set_level(logging.INFO, logger="tradecanvas.bus")
    async with publishing(redis_url, tmp_path, PublisherSettings(keys=keys)) as bus:
        publisher = bus.publisher
        feed = await bus.start_feed(redis_url, keys, sink, series={BTC1: None})
        await commit_and_publish(bus.pipeline, history[:3])
        await _drained(publisher)
        # a restarted ingest node sends them again: refused below a top of its own, quietly
        again = BusPublisher(redis_url, PublisherSettings(keys=keys))
        again.publish_closed(BTC1, history[:3])
        again.close()
        with trio.fail_after(WAIT_S):
            await again.run()
        assert again.statistics().outbox.already_published == 3
        assert again.readiness(streams=True)["bus_streams_writable"] is True
        # an operator's test entry far in the future: every later XADD of BTC1 is refused
        async with open_redis(redis_url) as client:
            await client.xadd(stream, {CANDLE_FIELD: b"test"}, identifier=FUTURE)
            # a notice whose number skips one: the edge reads every stream, the foreign
            # entry too (malformed: its read position on BTC1 goes past it)
            number = await client.incr(keys.batches_count) + 1
            await client.set(keys.batches_count, number)
            await client.xadd(keys.batches, {b"n": str(number), b"keys": b""})
        await commit_and_publish(bus.pipeline, history[3:5])
        await _drained(publisher)
        await commit_and_publish(bus.pipeline, history[5:7])
        await _drained(publisher)
        errors = _errors(caplog)
        assert len(errors) == 1, errors  # once, naming the stream and the offending ID
        assert stream in errors[0] and FUTURE in errors[0] and "blocked" in errors[0]
        assert publisher.statistics().outbox.blocked == 4
        assert publisher.statistics().outbox.already_published == 0
        assert publisher.blocked_streams() == {stream: StreamId(99999999999999)}
        assert publisher.readiness(streams=True) == {
            "bus_publisher_connected": True,
            "bus_streams_writable": False,
            "bus_events_match_store": True,
        }
        # an edge's publisher (HTTP writes) does not take its edge out for it
        assert publisher.readiness(streams=False) == {"bus_publisher_connected": True}
        # the repair: the stream goes (the store holds whatever it held); the next bar is
        # appended, the edge fills the blocked ones from the store, in order, once
        async with open_redis(redis_url) as client:
            await client.delete([stream])
        await commit_and_publish(bus.pipeline, history[7:])
        await _drained(publisher)
        assert publisher.blocked_streams() == {}
        assert publisher.readiness(streams=True)["bus_streams_writable"] is True
        assert any("takes entries again" in r.getMessage() for r in caplog.records)
        await sink.wait_for(lambda: sink.times(BTC1)[-1:] == [history[-1].candle_time])
        assert sink.closed[BTC1] == await stored(bus.pipeline.store, BTC1) == history
        # the edge that read past the foreign entry gets the repaired stream's entries
        # from the notices that carry them
        assert feed.statistics().malformed == 1
        assert feed.statistics().filled_candles >= 4
    assert len(_errors(caplog)) == 1


@pytest.mark.parametrize(
    "foreign",
    ["garbage", "star", "not_closed", "deleted", "oversized", "events"],
)
async def test_each_kind_of_foreign_top_blocks(
    redis_url: str, keys: StreamKeys, caplog: pytest.LogCaptureFixture, foreign: str
) -> None:
    """Whatever the foreign top is — not a candle, an ID made by Redis's clock (``*``), a
    well-formed bar that has not closed, an entry deleted after it was added, a payload
    over the cap, an events stream's garbage — the entries below it are blocked, not taken
    as published."""
    stream = keys.events if foreign == "events" else keys.series(BTC1)
    future = 4_102_444_800  # 2100-01-01, a minute boundary
    async with open_redis(redis_url) as client:
        if foreign == "garbage":
            await client.xadd(stream, {CANDLE_FIELD: b"[1]"}, identifier=f"{future * 1000}-0")
        elif foreign == "star":  # a real bar, under an ID of Redis's clock (not a bar's)
            await client.xadd(stream, {CANDLE_FIELD: encode_candle(minutes(T0, 1)[0])})
        elif foreign == "not_closed":
            bar = encode_candle(minutes(future, 1)[0])
            await client.xadd(stream, {CANDLE_FIELD: bar}, identifier=f"{future * 1000}-0")
        elif foreign == "deleted":
            await client.xadd(stream, {CANDLE_FIELD: b"x"}, identifier=FUTURE)
            await client.xdel(stream, [FUTURE])
        elif foreign == "oversized":
            bar = encode_candle(minutes(T0 + 600, 1)[0])
            padded = bar[:-1] + b" " * MAX_PAYLOAD_BYTES + b"]"
            await client.xadd(stream, {CANDLE_FIELD: padded}, identifier=f"{(T0 + 600) * 1000}-0")
        else:
            await client.xadd(stream, {EVENT_FIELD: b"{}"}, identifier="9000000-0")
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    if foreign == "events":
        for event_id in (1, 2):
            publisher.publish_system(SystemEvent(BTC1, "backfill", T0, T0, event_id=event_id))
    else:
        publisher.publish_closed(BTC1, minutes(T0, 2))
    publisher.close()
    with caplog.at_level(logging.ERROR), trio.fail_after(WAIT_S):
        await publisher.run()
    errors = _errors(caplog)
    assert len(errors) == 1 and stream in errors[0], errors
    assert publisher.statistics().outbox.blocked == 2
    assert list(publisher.blocked_streams()) == [stream]


async def test_the_ingest_is_not_ready_while_a_stream_is_blocked_and_says_so_in_metrics(
    tmp_path: Path, private_redis: PrivateRedis
) -> None:
    """On role ingest /readyz has ``bus_streams_writable`` (false while a stream is blocked:
    the bus is what the ingest is for) and the metrics count the blocked streams."""
    await private_redis.start()
    flags = build_runtime_flags(
        {
            "TRADE_CANVAS_ROLE": "ingest",
            "TRADE_CANVAS_REDIS_URL": private_redis.url,
            "TRADE_CANVAS_DB_PATH": str(tmp_path / "m.sqlite3"),
            "TRADE_CANVAS_HTTP_PORT": "0",
        }
    ).flags
    runtime = await market_runtime_builder(flags)
    try:
        publisher = runtime.bus_publisher
        assert publisher is not None
        assert runtime.readiness()["bus_streams_writable"] is True
        stream = stream_keys(flags).series(BTC1)
        async with open_redis(private_redis.url) as client:
            await client.xadd(stream, {CANDLE_FIELD: b"test"}, identifier=FUTURE)
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            publisher.publish_closed(BTC1, minutes(T0, 3))
            await _drained(publisher)
            assert runtime.readiness()["bus_streams_writable"] is False
            metrics = runtime.metrics.render().decode()
            assert "tradecanvas_bus_blocked_streams 1.0" in metrics
            assert "tradecanvas_bus_blocked_entries 3.0" in metrics
            nursery.cancel_scope.cancel()
    finally:
        await runtime.store.aclose()


async def _output_bytes(url: str) -> int:
    async with open_redis(url) as client:
        stats = await client.info("stats")
    sent = stats["total_net_output_bytes"]
    assert isinstance(sent, int), sent
    return sent


async def test_a_batch_of_refusals_carries_each_stream_top_once(
    private_redis: PrivateRedis,
) -> None:
    """Hundreds of entries refused below a 64 KiB foreign top, and hundreds below a top of
    ours, in one batch: each stream's top comes back once, not once per refused entry (a
    foreign 64 KiB top and 2,000 refusals made a 128 MB reply, RSS +250 MiB), and each
    refusal is still judged by its own stream's top: blocked, or already published. On a
    private server: its byte count is the publisher's alone."""
    await private_redis.start()
    url, keys, refused = private_redis.url, StreamKeys("tctest:tops:"), 300
    eth1 = "binance:futures:ETH/USDT:1m"
    async with open_redis(url) as client:
        await client.xadd(keys.series(BTC1), {CANDLE_FIELD: b"x" * 65_536}, identifier=FUTURE)
    history = minutes(T0, refused + 2)
    first = BusPublisher(url, PublisherSettings(keys=keys))
    first.publish_closed(eth1, history[:refused])
    first.close()
    with trio.fail_after(WAIT_S):
        await first.run()
    publisher = BusPublisher(url, PublisherSettings(keys=keys))
    for i in range(refused):  # the two streams' refusals interleaved
        publisher.publish_closed(BTC1, history[i : i + 1])
        publisher.publish_closed(eth1, history[i : i + 1])
    publisher.publish_closed(eth1, history[refused:])  # appended after them
    publisher.close()
    before = await _output_bytes(url)
    with trio.fail_after(WAIT_S):
        await publisher.run()
    sent = await _output_bytes(url) - before
    assert publisher.statistics().batches == 1
    outbox = publisher.statistics().outbox
    assert (outbox.blocked, outbox.already_published, outbox.appended) == (refused, refused, 2)
    assert publisher.blocked_streams() == {keys.series(BTC1): StreamId(99999999999999)}
    # the foreign top once (and the notice, the connection's own commands): not 300 times
    assert 65_536 < sent < 2 * 65_536, sent
