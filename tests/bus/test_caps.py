"""An edge caps what it accepts per entry (``wire/bus.py``'s ``MAX_PAYLOAD_BYTES``): an
oversized entry, on a stream, in a notice or on the forming channel, is refused unparsed as
a malformed one is, with a log line saying so, and its candle comes from the store."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.bus.rig import (
    BTC,
    BTC1,
    T0,
    RecordingSink,
    commit_and_publish,
    minutes,
    publishing,
)
from tests.conftest import candle
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.publisher import PublisherSettings
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.model import Candle
from tradecanvas.pipeline.commit import IngestBatch
from tradecanvas.wire.bus import CANDLE_FIELD, MAX_PAYLOAD_BYTES, encode_candle, encode_forming


def _padded(payload: bytes) -> bytes:
    """``payload`` (a JSON array) with whitespace past the cap: still valid JSON."""
    return payload[:-1] + b" " * MAX_PAYLOAD_BYTES + b"]"


def _forged(bar: Candle) -> Candle:
    """The same bar with other prices: delivered, it would show."""
    return candle(bar.candle_time, "1", "2", "1", "2", "9")


async def test_an_oversized_entry_is_malformed_and_its_candle_comes_from_the_store(
    redis_url: str, keys: StreamKeys, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    history = minutes(T0, 8)
    sink = RecordingSink()
    caplog.set_level(logging.WARNING, logger="tradecanvas.bus")
    async with publishing(redis_url, tmp_path, PublisherSettings(keys=keys)) as bus:
        feed = await bus.start_feed(redis_url, keys, sink, series={BTC1: None})
        await commit_and_publish(bus.pipeline, history[:2])
        await sink.wait_for(lambda: sink.times(BTC1) == [c.candle_time for c in history[:2]])
        # bars 2..4 committed; on the stream bar 2 forged and padded past the cap, then 3,
        # in a notice (carried) bar 4 forged and padded, then 5 the normal way
        await bus.pipeline.run(IngestBatch.of(BTC, history[2:5], "ws"))
        big2 = _padded(encode_candle(_forged(history[2])))
        big4 = _padded(encode_candle(_forged(history[4])))
        stream = keys.series(BTC1)
        async with open_redis(redis_url) as client:
            for bar, payload in ((history[2], big2), (history[3], encode_candle(history[3]))):
                await client.xadd(
                    stream, {CANDLE_FIELD: payload}, identifier=f"{bar.candle_time * 1000}-0"
                )
            number = await client.incr(keys.batches_count)
            await client.xadd(keys.batches, {b"n": str(number), b"keys": stream})
            carried = b"%s\n%d-0\n%d\n%s" % (
                stream.encode(),
                history[4].candle_time * 1000,
                len(big4),
                big4,
            )
            number = await client.incr(keys.batches_count)
            await client.xadd(
                keys.batches, {b"n": str(number), b"keys": stream, b"entries": carried}
            )
            # a forming message past the cap is dropped as malformed too
            forming = _padded(encode_forming(BTC1, history[5]))
            await client.publish(keys.forming, forming)
        await commit_and_publish(bus.pipeline, history[5:])
        await bus.publisher.wait_drained()
        await sink.wait_for(lambda: sink.times(BTC1)[-1:] == [history[-1].candle_time])
    assert sink.closed[BTC1] == history  # the forged bars never reached a subscriber
    assert feed.statistics().malformed >= 2
    capped = [r.getMessage() for r in caplog.records if "over the cap of 65536" in r.getMessage()]
    assert capped and all("malformed" in line for line in capped), capped
    assert any(f"{history[2].candle_time * 1000}-0" in line for line in capped), capped
