"""What the ingest lease holder tells the edges of Binance (``bus/ingest_report.py``): the
report's rules, then the holder writing it and an edge's watch reading it on the real Redis,
including the report going away with the lease."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import trio

from tests.bus.conftest import PrivateRedis
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.ingest_report import IngestReport, IngestReportWatch, decode
from tradecanvas.bus.leader import FencedStore, IngestLeader
from tradecanvas.bus.lease import LeaseTiming
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.errors import WireError
from tradecanvas.ops.metrics import Metrics
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.bus import MAX_PAYLOAD_BYTES

WAIT_S = 30.0


def test_a_report_round_trips() -> None:
    report = IngestReport("host:12:ab34cd", upstream_connected=True)
    assert decode(report.encode()) == report
    assert report.to_json() == {"node": "host:12:ab34cd", "upstream_connected": True}


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"not json",
        b"[1, 2]",
        b'{"node": "a"}',
        b'{"node": 1, "upstream_connected": true}',
        b'{"node": "a", "upstream_connected": 1}',
    ],
)
def test_what_is_not_a_report_is_refused(raw: bytes) -> None:
    with pytest.raises(WireError, match="ingest_report"):
        decode(raw)


def test_an_oversized_report_is_refused_unparsed() -> None:
    padded = b'{"node": "a", "upstream_connected": true' + b" " * MAX_PAYLOAD_BYTES + b"}"
    with pytest.raises(WireError, match="over 65536"):
        decode(padded)


def _unknown(why: str) -> dict[str, Any]:
    return {"ingest": {"node": None, "upstream_connected": None, "unknown": why}}


def test_the_watch_shows_ingest_unknown_until_redis_answered_then_what_it_holds(
    caplog: pytest.LogCaptureFixture,
) -> None:
    watch = IngestReportWatch("redis://127.0.0.1:1/0", StreamKeys("t:"))
    # /readyz's body has the same fields at every moment: not read yet is said, not left out
    assert watch.readyz_fields() == _unknown("Redis not read yet")
    watch.set_raw(None)
    assert watch.readyz_fields() == {"ingest": None}  # no node holds the lease
    watch.set_raw(IngestReport("a", False).encode())
    assert watch.readyz_fields() == {"ingest": {"node": "a", "upstream_connected": False}}
    with caplog.at_level(logging.WARNING):
        watch.set_raw(b"garbage")
        watch.set_raw(b"garbage")
    assert watch.readyz_fields() == {"ingest": None}
    # logged once while it stays bad, naming the key
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "t:ingest_report holds no report" in logged[0], logged
    watch.set_raw(IngestReport("b", True).encode())  # good again: a new bad one is logged
    with caplog.at_level(logging.WARNING):
        watch.set_raw(b"[]")
    assert len(caplog.records) == 2


async def _until(watch: IngestReportWatch, shown: Callable[[dict[str, Any]], bool]) -> None:
    with trio.fail_after(WAIT_S):
        while not shown(watch.readyz_fields()):
            await watch.wait_read()


async def test_the_holder_reports_binance_and_the_report_goes_with_the_lease(
    store: CandleStore, redis_url: str, keys: StreamKeys
) -> None:
    connected = [False]
    leader = IngestLeader(
        redis_url, keys, FencedStore(store), Metrics(), timing=LeaseTiming(400), node="a"
    )
    leader.upstream_connected = lambda: connected[0]
    watch = IngestReportWatch(redis_url, keys, poll_s=0.02)

    async def nothing() -> None:
        pass

    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        await _until(watch, lambda f: f == {"ingest": None})  # nobody holds the lease
        async with trio.open_nursery() as alive:
            await alive.start(leader.run, nothing)
            lost = {"ingest": {"node": "a", "upstream_connected": False}}
            await _until(watch, lambda f: f == lost)
            connected[0] = True
            up = {"ingest": {"node": "a", "upstream_connected": True}}
            await _until(watch, lambda f: f == up)
            # the key expires with the lease's TTL
            async with open_redis(redis_url) as client:
                ttl = await client.pttl(keys.ingest_report)
            assert 0 < ttl <= 400
            alive.cancel_scope.cancel()  # killed: no release, no more renewals
        await _until(watch, lambda f: f == {"ingest": None})
        async with open_redis(redis_url) as client:
            assert await client.get(keys.lease) is None  # gone with the same TTL
        # a clean stop lets both go at once (the TTL is long here: no expiry helps)
        slow = IngestLeader(
            redis_url, keys, FencedStore(store), Metrics(), timing=LeaseTiming(60_000)
        )
        async with trio.open_nursery() as alive:
            await alive.start(slow.run, nothing)
            await _until(watch, lambda f: f.get("ingest") is not None)
            alive.cancel_scope.cancel()
        await slow.release()
        await _until(watch, lambda f: f == {"ingest": None})
        nursery.cancel_scope.cancel()


async def test_the_watch_says_why_it_knows_nothing_while_redis_is_away(
    private_redis: PrivateRedis,
) -> None:
    """After a Redis failure (a restart) the watch knows nothing until its next read, a
    backoff later: ``ingest`` is shown unknown with why, not left out of /readyz's body."""
    await private_redis.start()
    watch = IngestReportWatch(private_redis.url, StreamKeys("t:"), poll_s=0.02)
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        with trio.fail_after(WAIT_S):
            await watch.wait_read()
        assert watch.readyz_fields() == {"ingest": None}
        private_redis.stop()
        with trio.fail_after(WAIT_S):
            await watch.wait_failed()
        fields = watch.readyz_fields()
        assert list(fields) == ["ingest"], fields
        assert fields["ingest"]["upstream_connected"] is None
        assert fields["ingest"]["unknown"].startswith("Redis does not answer ("), fields
        await private_redis.start()
        with trio.fail_after(WAIT_S):
            await watch.wait_read()
        assert watch.readyz_fields() == {"ingest": None}
        nursery.cancel_scope.cancel()
