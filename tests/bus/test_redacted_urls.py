"""The bus's log lines name its Redis without the URL's password: the lease's "Redis answers
at" (every start of an ingest) and the publisher's and the feed's "reconnected to Redis at"
printed ``redis://default:<password>@…`` in full."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from tests.bus.conftest import PrivateRedis
from tests.bus.rig import (
    BTC1,
    BTC5,
    T0,
    WAIT_S,
    RecordingSink,
    commit_and_publish,
    minutes,
    publishing,
)
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.leader import FencedStore, IngestLeader
from tradecanvas.bus.lease import LeaseTiming
from tradecanvas.bus.publisher import PublisherSettings
from tradecanvas.ops.metrics import Metrics

SECRET = "rsecret-in-the-url"


async def test_the_bus_logs_its_redis_without_the_password(
    private_redis: PrivateRedis, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await private_redis.start()
    # the server's default user takes any password: the URL's is only there to be hidden
    url = f"redis://default:{SECRET}@127.0.0.1:{private_redis.port}/0"
    shown = f"redis://default:<redacted>@127.0.0.1:{private_redis.port}/0"
    keys = StreamKeys("redact:")
    with caplog.at_level("INFO", logger="tradecanvas.bus"):
        async with publishing(url, tmp_path, PublisherSettings(keys=keys)) as bus:
            feed = await bus.start_feed(url, keys, RecordingSink(), series={BTC1: T0, BTC5: T0})
            leader = IngestLeader(
                url, keys, FencedStore(bus.pipeline.store), Metrics(), timing=LeaseTiming(500)
            )
            async with trio.open_nursery() as lease:
                await lease.start(leader.run, trio.sleep_forever)
                with trio.fail_after(WAIT_S):
                    await leader.wait_leader()
                lease.cancel_scope.cancel()
            with trio.fail_after(WAIT_S):
                await bus.publisher.wait_connected()
                private_redis.stop()
                # the publisher learns of it at its next send
                await commit_and_publish(bus.pipeline, minutes(T0, 1))
                await bus.publisher.wait_connected(False)
                await feed.wait_connected(False)
                await private_redis.start()
                await bus.publisher.wait_connected()
                await feed.wait_connected()
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if SECRET in m] == []
    for said in (
        f"ingest lease: Redis answers at {shown}",
        f"bus publisher: reconnected to Redis at {shown}",
        f"edge feed (closed): reconnected to Redis at {shown}",
    ):  # each followed by how long the outage lasted, when there was one
        assert any(m == said or m.startswith(f"{said} after ") for m in messages), said
