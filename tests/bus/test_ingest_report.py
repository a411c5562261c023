"""What the ingest lease holder tells the edges of Binance (``bus/ingest_report.py``): the
report's rules, then the holder writing it and an edge's watch reading it on the real Redis,
including the report going away with the lease."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

import attrs
import orjson
import pytest
import trio

from tests.browser.rig import wait_for_line
from tests.bus.conftest import SHARED_URL, PrivateRedis, delete_prefix, new_prefix, require_redis
from tests.cli_rig import cli_env, run_cli
from tests.serve.test_healthz_upstream import ADA, ETH, spot_up_futures_down, wait_healthz
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.ingest_report import IngestReport, IngestReportWatch, decode
from tradecanvas.bus.leader import FencedStore, IngestLeader
from tradecanvas.bus.lease import LeaseTiming
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.errors import WireError
from tradecanvas.ingest.supervisor import ConnectionState
from tradecanvas.ops.metrics import Metrics
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.wire.bus import MAX_PAYLOAD_BYTES

WAIT_S = 30.0
EDGE_READY: Final = r"tradecanvas ready ws=\S+ http=(\S+)"


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


# --- each connection, for an edge's /healthz?series_id= ------------------------------------

SPOT_UP = ConnectionState("spot", ("binance:spot:ADA/BTC:1m",), True)
FUTURES_DOWN = ConnectionState("futures", ("binance:futures:ETH/USDT:1m",), False)


def test_a_report_carries_each_connection_and_an_older_one_none() -> None:
    report = IngestReport("a", False, (SPOT_UP, FUTURES_DOWN))
    assert decode(report.encode()) == report
    assert orjson.loads(report.encode())["connections"] == [
        {"market": "spot", "series": ["binance:spot:ADA/BTC:1m"], "connected": True},
        {"market": "futures", "series": ["binance:futures:ETH/USDT:1m"], "connected": False},
    ]
    # /readyz's `ingest` keeps its shape
    assert report.to_json() == {"node": "a", "upstream_connected": False}
    # an older ingest's report (a rolling upgrade): no connections, the rest as before
    assert decode(b'{"node": "a", "upstream_connected": false}').connections is None


@pytest.mark.parametrize(
    "connections",
    [
        b"7",
        b'[{"market": "spot", "series": "x", "connected": true}]',
        b'[{"market": "spot", "series": ["x"], "connected": "yes"}]',
        b'[{"market": "spot", "series": [1], "connected": true}]',
        b"[[]]",
    ],
)
def test_connections_an_edge_cannot_read_leave_the_rest_of_the_report(connections: bytes) -> None:
    """A newer ingest's format: the edge answers by ``upstream_connected``, as for an older
    one, rather than taking the whole report for garbage (no report: "no ingest")."""
    raw = b'{"node": "a", "upstream_connected": true, "connections": ' + connections + b"}"
    assert decode(raw) == IngestReport("a", True, None)


def test_connections_too_many_for_the_bus_are_left_out_not_the_report() -> None:
    many = tuple(
        ConnectionState("spot", tuple(f"binance:spot:S{i}{j}/USDT:1m" for j in range(200)), True)
        for i in range(20)
    )
    raw = IngestReport("a", True, many).encode()
    assert len(raw) <= MAX_PAYLOAD_BYTES
    assert decode(raw) == IngestReport("a", True, None)


async def test_the_holder_reports_each_connection_and_an_edge_reads_them(
    store: CandleStore, redis_url: str, keys: StreamKeys
) -> None:
    leader = IngestLeader(
        redis_url, keys, FencedStore(store), Metrics(), timing=LeaseTiming(400), node="a"
    )
    leader.connections = lambda: (SPOT_UP, FUTURES_DOWN)
    watch = IngestReportWatch(redis_url, keys, poll_s=0.02)
    assert watch.connections() is None  # nothing read yet

    async def nothing() -> None:
        pass

    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        await nursery.start(leader.run, nothing)
        with trio.fail_after(WAIT_S):
            while watch.connections() is None:
                await watch.wait_read()
        assert watch.connections() == (SPOT_UP, FUTURES_DOWN)
        nursery.cancel_scope.cancel()
    # an older ingest's report, as it writes it: the edge has no connections to go by
    async with open_redis(redis_url) as client:
        await client.set(keys.ingest_report, b'{"node": "old", "upstream_connected": true}')
    async with trio.open_nursery() as nursery:
        await nursery.start(watch.run)
        with trio.fail_after(WAIT_S):
            while watch.readyz_fields()["ingest"]["node"] != "old":
                await watch.wait_read()
        assert watch.connections() is None
        nursery.cancel_scope.cancel()


@pytest.fixture
def prefix() -> Iterator[str]:
    """A bus prefix of this test's own on the shared Redis; its keys deleted afterwards
    (for the tests that run the CLI: no trio fixture)."""
    require_redis()
    name = new_prefix()
    yield name
    trio.run(delete_prefix, SHARED_URL, name)


@pytest.mark.e2e
def test_an_edge_answers_each_series_for_the_ingest_connection_that_carries_it(
    tmp_path: Path, prefix: str
) -> None:
    """Role ingest with spot replayed and futures unreachable, an edge beside it on the same
    Redis and store: the edge's /healthz?series_id= says spot connected, futures not."""
    bus = {
        "TRADE_CANVAS_REDIS_URL": SHARED_URL,
        "TRADE_CANVAS_BUS_PREFIX": prefix,
        "TRADE_CANVAS_INGEST_LEASE_MS": "1000",
    }
    with spot_up_futures_down(tmp_path, TRADE_CANVAS_ROLE="ingest", **bus) as ingest:
        env = cli_env(
            TRADE_CANVAS_ROLE="edge",
            TRADE_CANVAS_SERIES=f"{ADA},{ETH}",
            TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
            TRADE_CANVAS_DB_PATH=str(tmp_path / "market.sqlite3"),
            **bus,
        )
        edge_proc = ingest.stack.enter_context(run_cli(["serve"], env, tmp_path / "edge.log"))
        edge = attrs.evolve(ingest, serve=edge_proc)
        edge.http_url = wait_for_line(tmp_path / "edge.log", EDGE_READY, edge_proc).group(1)
        body = wait_healthz(edge, lambda b: b["upstream"] == "connected", series_id=ADA)
        assert body["connections"] == {
            "futures": {"open": 0, "total": 1},
            "spot": {"open": 1, "total": 1},
        }
        assert wait_healthz(edge, lambda b: True, series_id=ETH)["upstream"] == "disconnected"
        # the whole node's meaning: not every connection of the ingest is open
        assert edge.get("/healthz")["upstream"] == "disconnected"
