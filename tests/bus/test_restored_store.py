"""A store restored from an older backup under a bus that kept its keys (or a bus of another
store): the events stream's last id is above the event log's newest, the log hands out the
stream's ids again and Redis refuses them as already published. The ingest's event tail
finds it when it starts (``bus/events_ahead.py``): an ERROR naming both ids and the repair,
``tradecanvas_bus_events_stream_ahead``, ``/readyz`` ``bus_events_match_store`` false;
deleting the bus keys repairs it. Real Redis (a prefix of each test's own) and PostgreSQL (a
database of each test's own)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import httpx
import psycopg
import pytest
import trio
from psycopg import sql

from tests.bus.cluster import Node, _node, paused_replay, roles_env, stop, wait_ready
from tests.bus.conftest import delete_prefix
from tests.bus.rig import BTC1, WAIT_S, run_closed
from tests.bus.roles_rig import BASE, FIVE, TOKEN, metric, metrics_text, source, wait_for
from tests.cli_rig import wait_for_line
from tests.recording_subscriber import Subscriber
from tests.store_pg.conftest import ADMIN_URL
from tradecanvas.bus.events_ahead import EventsAhead
from tradecanvas.bus.ids import StreamId, StreamKeys
from tradecanvas.bus.publisher import BusPublisher, PublisherSettings
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.bus.roles import watch_dependencies
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.event_tail import EventTail
from tradecanvas.store.interface import MarketStore, WriteTxn
from tradecanvas.store.open import open_store

AHEAD_METRIC: Final = "tradecanvas_bus_events_stream_ahead"
ERROR_LINE: Final = "runs ahead of the store's event log"


@pytest.fixture
async def pg_store(pg_url: str) -> AsyncIterator[MarketStore]:
    store = await open_store(pg_url)
    yield store
    await store.aclose()


async def _log(store: MarketStore, count: int) -> list[int]:
    def append(txn: WriteTxn) -> list[int]:
        data = {"reason": "backfill", "from_time": 0, "to_time": 60}
        return [txn.append_event(BTC1, "factor.rebuild", data, time.time()) for _ in range(count)]

    return await store.write(append)


def _event(event_id: int) -> SystemEvent:
    return SystemEvent(BTC1, "backfill", 0, 60, event_id=event_id)


async def _published_before(url: str, keys: StreamKeys, ids: list[int]) -> None:
    """What the nodes of the store's past published (their publisher, not the test's)."""
    publisher = BusPublisher(url, PublisherSettings(keys=keys))
    for event_id in ids:
        publisher.publish_system(_event(event_id))
    with trio.fail_after(WAIT_S):
        await run_closed(publisher)


async def _stream_ids(url: str, keys: StreamKeys) -> list[int]:
    async with open_redis(url) as client:
        return [StreamId.parse(e.identifier).ms for e in await client.xrange(keys.events)]


def test_the_log_passing_the_stream_top_is_no_repair() -> None:
    ahead = EventsAhead(StreamKeys("t:"))
    assert ahead.check(11, 11) is False and ahead.ids_ahead() == 0
    assert ahead.check(25, 11) is True and ahead.ids_ahead() == 14
    # the log hands out 12..26: the stream takes 26, but 12..25 were refused all the same
    assert ahead.check(26, 26) is True and ahead.ids_ahead() == 14
    # the stream deleted (the repair), new events on a new one
    assert ahead.check(3, 30) is False and ahead.ids_ahead() == 0
    assert ahead.findings == 1


async def test_a_log_behind_the_events_stream_is_found_told_and_repaired(
    pg_store: MarketStore,
    redis_url: str,
    keys: StreamKeys,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("tradecanvas.serve.event_tail.RECHECK_S", 0.05, raising=False)
    caplog.set_level(logging.INFO)
    kept = await _log(pg_store, 11)  # the restored backup's log: events 1..11
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    metrics = Metrics()
    watch_dependencies(metrics, pg_store, publisher, None)
    tail = EventTail(pg_store, publisher, cursor=kept[-1], poll_interval_s=0.05)
    own = tail.own_store()
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        # the bus as the store left it before the restore: events 1..25 published
        await _published_before(redis_url, keys, list(range(1, 26)))
        with trio.fail_after(WAIT_S):
            await nursery.start(tail.run)  # the ingest takes the lease: the tail starts
        errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
        assert len(errors) == 1 and ERROR_LINE in errors[0], errors
        assert "its last entry is event 25, the store's newest event 11" in errors[0]
        assert f"--pattern '{keys.prefix}*'" in errors[0] and "ids 12..25 again" in errors[0]
        assert publisher.readiness(streams=True)["bus_events_match_store"] is False
        assert metric(metrics.render().decode(), AHEAD_METRIC) == 14
        assert tail.cursor == kept[-1]  # not moved up to a top the log does not hold
        # what the reviewer saw: the log's next ids are refused as already published
        new = await _log(own, 3)
        assert new == [12, 13, 14]
        for event_id in new:
            publisher.publish_system(_event(event_id))
        with trio.fail_after(WAIT_S):
            await publisher.wait_drained()
        assert publisher.statistics().outbox.already_published == 3
        assert publisher.readiness(streams=True)["bus_events_match_store"] is False
        # the repair: the bus keys deleted; the tail sees it at its next check
        await delete_prefix(redis_url, keys.prefix)
        await wait_for(
            lambda: publisher.readiness(streams=True)["bus_events_match_store"], "repaired"
        )
        assert metric(metrics.render().decode(), AHEAD_METRIC) == 0
        assert "no longer runs ahead of the event log" in caplog.text
        later = await _log(own, 1)
        publisher.publish_system(_event(later[0]))
        with trio.fail_after(WAIT_S):
            await publisher.wait_drained()
        assert await _stream_ids(redis_url, keys) == later
        nursery.cancel_scope.cancel()
    assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1


async def test_a_log_pruned_to_nothing_is_not_behind_its_stream(
    pg_store: MarketStore, redis_url: str, keys: StreamKeys, caplog: pytest.LogCaptureFixture
) -> None:
    ids = await _log(pg_store, 5)
    # the retention drops every event (all older than now): the counter keeps their ids
    await pg_store.write(lambda txn: txn.prune_events(0, time.time() + 60))
    assert await pg_store.events_after(0, limit=10) == []
    publisher = BusPublisher(redis_url, PublisherSettings(keys=keys))
    tail = EventTail(pg_store, publisher, cursor=0)
    async with trio.open_nursery() as nursery:
        await nursery.start(publisher.run)
        await _published_before(redis_url, keys, ids)
        with caplog.at_level(logging.INFO), trio.fail_after(WAIT_S):
            await nursery.start(tail.run)
        nursery.cancel_scope.cancel()
    assert publisher.events_ahead.found is None, caplog.text
    assert publisher.readiness(streams=True)["bus_events_match_store"] is True
    assert ERROR_LINE not in caplog.text


# --- the reviewer's case: real nodes, a real restore -------------------------------------


@pytest.fixture
def backup_db(pg_url: str) -> Iterator[str]:
    """The name of a database to hold the backup (a copy of the store's); dropped after."""
    name = f"{pg_url.rsplit('/', 1)[1]}_bk"
    yield name
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def _copy_db(source_db: str, target_db: str) -> None:
    """``target_db`` made again as a copy of ``source_db`` (no session may be on either):
    a backup, and a restore of it (as ``pg_dump -Fc`` and ``pg_restore`` after a drop and
    create)."""
    with psycopg.connect(ADMIN_URL, autocommit=True) as admin:
        target = sql.Identifier(target_db)
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(target))
        admin.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(target, sql.Identifier(source_db))
        )


async def _events_top(url: str, keys: StreamKeys) -> int:
    ids = await _stream_ids(url, keys)
    return ids[-1] if ids else 0


async def _newest(database_url: str) -> int:
    store = await open_store(database_url)
    try:
        return await store.events_newest_id()
    finally:
        await store.aclose()


async def _revise(http: str, candle_time: int, price: float) -> None:
    """An HTTP write that revises a stored minute: a factor.rebuild per timeframe."""
    candle = {"candle_time": candle_time, "open": price, "high": price, "low": price}
    async with httpx.AsyncClient(base_url=http) as client:
        answer = await client.post(
            "/api/market/ingest/candle_closed",
            json={"series_id": BASE, "candle": {**candle, "close": price, "volume": 1}},
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
    assert answer.status_code == 200, answer.text


async def _live_events(edge: Node, ingest: Node, database_url: str, when: int) -> list[int]:
    """The ids of the events a write on the ingest raised (read from the store), once an
    edge's subscriber (``events_after``: the log's newest before the write) got each of them
    live; a duplicate fails."""
    before = await _newest(database_url)
    subscriber = Subscriber()
    async with trio.open_nursery() as nursery:
        subscribe = [
            {"type": "subscribe", "series_id": sid, "events_after": before} for sid in (BASE, FIVE)
        ]
        await nursery.start(subscriber.run, edge.ws, subscribe)
        await _revise(ingest.http, when, 7.0)
        store = await open_store(database_url)
        try:
            raised = [e.event_id for e in await store.events_after(before, limit=100)]
        finally:
            await store.aclose()
        assert raised, "the write raised no event"

        def got() -> list[int]:
            return [m["event_id"] for m in subscriber.of_type("system")]

        await subscriber.wait_until(lambda: set(raised) <= set(got()), WAIT_S)
        nursery.cancel_scope.cancel()
    assert set(raised) <= set(got()) and len(got()) == len(set(got())), (raised, got())
    return raised


@pytest.mark.e2e
async def test_a_restored_store_under_a_kept_bus_is_refused_by_readyz_until_the_keys_go(
    tmp_path: Path, redis_url: str, keys: StreamKeys, pg_url: str, backup_db: str
) -> None:
    data = source(tmp_path)
    db = pg_url.rsplit("/", 1)[1]
    async with paused_replay(tmp_path, data) as replay:
        env = roles_env(
            replay,
            redis_url=redis_url,
            prefix=keys.prefix,
            database_url=pg_url,
            TRADE_CANVAS_INGEST_TOKEN=TOKEN,
        )
        with contextlib.ExitStack() as stack:
            ingest = await _node(stack, tmp_path, "ingest-1", "ingest", env)
            await wait_ready(ingest, "upstream_connected", True)
            await stop(ingest)
            newest = await _newest(pg_url)
            _copy_db(db, backup_db)  # the backup: pg_dump at event `newest`
            ingest = await _node(stack, tmp_path, "ingest-2", "ingest", env)
            await _revise(ingest.http, data.minutes[1].candle_time, 5.0)  # events after it
            later = await _newest(pg_url)
            assert later > newest
            await wait_for(lambda: _at(redis_url, keys, later), "the revision on the stream")
            await stop(ingest)
            _copy_db(backup_db, db)  # the restore, every node stopped, the bus kept
            assert await _newest(pg_url) == newest
            ingest = await _node(stack, tmp_path, "ingest-3", "ingest", env)
            edge = await _node(stack, tmp_path, "edge-3", "edge", env)
            line = await wait_for_line(
                ingest.log,
                ERROR_LINE + r": its last entry is event (\d+), the store's newest"
                r" event (\d+)",
                ingest.proc,
            )
            # (the newest: the backup's, or above it by what this start-up logged)
            top, behind = int(line.group(1)), int(line.group(2))
            assert top >= later > behind >= newest, line.group(0)
            await wait_ready(ingest, "bus_events_match_store", False)
            text = await metrics_text(ingest.http)
            assert metric(text, AHEAD_METRIC) == top - behind
            await stop(ingest, edge)
            # the repair (docs/operations.md): every node stopped, the bus keys deleted
            await delete_prefix(redis_url, keys.prefix)
            ingest = await _node(stack, tmp_path, "ingest-4", "ingest", env)
            edge = await _node(stack, tmp_path, "edge-4", "edge", env)
            await wait_ready(ingest, "bus_events_match_store", True)
            await _live_events(edge, ingest, pg_url, data.minutes[2].candle_time)
            assert ERROR_LINE not in ingest.log.read_text()
            await stop(ingest, edge)


async def _at(url: str, keys: StreamKeys, event_id: int) -> bool:
    """Whether the events stream holds ``event_id`` or a later one."""
    return await _events_top(url, keys) >= event_id
