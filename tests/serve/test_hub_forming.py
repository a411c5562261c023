"""The forming snapshot: a client that subscribes (or subscribes again with a new cursor) gets
the series' newest forming candle once its catch-up is sent — without waiting for the next
forming update — only above its cursor, never of a bar that has closed, never ahead of a
close it is owed, and never twice in a row.

Socket-level: real trio-websocket clients against the real server on 127.0.0.1 port 0 and a
real SQLite store (the rigs of tests/serve/test_ws_server.py), on both ports, batch and not,
base and derived series, an edge's Hub fed by a real bus. Then a property test of the Hub
with the fake connection and in-memory store of tests/serve/test_hub.py: random publishes,
commits, forming updates and subscribes, checked against what a charting client ends with.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractContextManager, AsyncExitStack
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.bus.conftest import _COREDIS_LEAK
from tests.bus.conftest import keys as keys  # the edge test's bus
from tests.bus.conftest import redis_url as redis_url
from tests.bus.rig import WAIT_S, commit_and_publish, edge_feed, minutes, publishing
from tests.conftest import flat_minutes
from tests.serve.test_hub import T0, FakeSocket, MemoryReader, connected, make_hub, settled
from tests.serve.test_ws_server import (
    SERIES_1M,
    SID_1M,
    SID_5M,
    TRANSPORTS,
    closed_times,
    connect,
    real_candles,
    receive,
    running_market,
    send,
    subscribe_msg,
    until_pong,
)
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.publisher import PublisherSettings
from tradecanvas.model import Candle
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.hub import Hub
from tradecanvas.store.sqlite import CandleStore

HISTORY: Final = 10  # closed bars stored before the forming one


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    yield opened
    await opened.aclose()


def _history(series_id: str) -> tuple[list[Candle], Candle]:
    """``HISTORY`` real closed bars of the series and the real bar after them (forming)."""
    bars = real_candles("5m" if series_id == SID_5M else "1m")
    return list(bars[:HISTORY]), bars[HISTORY]


def _forming(series_id: str, candle: Candle) -> dict[str, Any]:
    return {"type": "candle_forming", "series_id": series_id, "candle": candle.to_wire()}


def _of(messages: Sequence[dict[str, Any]], series_id: str) -> list[dict[str, Any]]:
    return [m for m in messages if m.get("series_id") == series_id]


def _overtaken(messages: Sequence[dict[str, Any]]) -> list[tuple[int, int]]:
    """Per series, each closed candle sent after a forming candle of a later bar: (forming
    time, closed time). A chart keeps its newest bar and drops such a close (DESIGN §10)."""
    newest: dict[str, int] = {}
    found: list[tuple[int, int]] = []
    for m in messages:
        sid = m.get("series_id", "")
        if m["type"] == "candle_forming":
            newest[sid] = max(newest.get(sid, -1), m["candle"]["candle_time"])
        found += [(newest[sid], t) for t in closed_times([m]) if t < newest.get(sid, -1)]
    return found


async def _stored(store: CandleStore, hub: Hub) -> dict[str, Candle]:
    """Both series' history stored and published; their next bars published as forming."""
    formings: dict[str, Candle] = {}
    for sid in (SID_1M, SID_5M):
        history, forming = _history(sid)
        await store.upsert(sid, history, "ws")
        hub.publish_closed(sid, history)
        hub.publish_forming(sid, forming)
        formings[sid] = forming
    return formings


# --- over sockets -------------------------------------------------------------------------


@pytest.mark.parametrize("over", TRANSPORTS)
@pytest.mark.parametrize("batch", [True, False], ids=["batch", "plain"])
@pytest.mark.parametrize("since", ["last_closed", "earlier", "null"])
@pytest.mark.parametrize("series_id", [SID_1M, SID_5M], ids=["1m", "derived_5m"])
async def test_a_new_subscriber_gets_the_forming_bar_right_after_its_catch_up(
    store: CandleStore, over: str, batch: bool, since: str, series_id: str
) -> None:
    history, _ = _history(series_id)
    cursor = {
        "last_closed": history[-1].candle_time,
        "earlier": history[4].candle_time,
        "null": None,
    }[since]
    async with running_market(store, over=over) as market, connect(market.port) as ws:
        formings = await _stored(store, market.hub)
        # nothing is published from here on: the forming bar comes with the subscribe
        await send(ws, subscribe_msg(series_id, since=cursor, batch=batch))
        got = await until_pong(ws)
    want = [c.candle_time for c in history if cursor is None or c.candle_time > cursor]
    assert closed_times(got) == want
    assert {m["type"] for m in got[:-1]} <= {"candles_batch" if batch else "candle_closed"}
    assert got[-1] == _forming(series_id, formings[series_id])
    assert _overtaken(got) == []


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "plain"])
@pytest.mark.parametrize("published", [True, False], ids=["published", "stored_only"])
async def test_a_forming_bar_whose_bucket_has_closed_is_not_sent(
    store: CandleStore, batch: bool, published: bool
) -> None:
    # stored_only: the close was committed but this Hub never saw it published (an edge
    # passes over a series nobody follows there; a strict publish that failed)
    async with running_market(store) as market, connect(market.port) as ws:
        formings = await _stored(store, market.hub)
        closed = formings[SID_1M]  # its minute closes: the remembered forming bar is stale
        await store.upsert(SID_1M, [closed], "ws")
        if published:
            market.hub.publish_closed(SID_1M, [closed])
        history, _ = _history(SID_1M)
        history5, _ = _history(SID_5M)
        await send(ws, subscribe_msg(SID_1M, since=history[-1].candle_time, batch=batch))
        await send(ws, subscribe_msg(SID_5M, since=history5[-1].candle_time, batch=batch))
        got = await until_pong(ws)
    one = _of(got, SID_1M)
    assert closed_times(one) == [closed.candle_time]
    assert [m for m in one if m["type"] == "candle_forming"] == []
    # the 5m bar is still forming: it comes (the 1m one above would, had it not closed)
    assert _of(got, SID_5M) == [_forming(SID_5M, formings[SID_5M])]


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "plain"])
@pytest.mark.parametrize("above", [0, 60, 3600], ids=["at_it", "a_bar_above", "far_above"])
async def test_no_forming_bar_at_or_below_the_cursor(
    store: CandleStore, batch: bool, above: int
) -> None:
    async with running_market(store) as market, connect(market.port) as ws:
        formings = await _stored(store, market.hub)
        since = formings[SID_1M].candle_time + above
        await send(ws, subscribe_msg(SID_1M, since=since, batch=batch))
        await send(ws, subscribe_msg(SID_5M, since=None, batch=batch))
        got = await until_pong(ws)
    assert _of(got, SID_1M) == []
    assert _of(got, SID_5M)[-1] == _forming(SID_5M, formings[SID_5M])


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "plain"])
async def test_a_new_cursor_gets_its_catch_up_then_the_forming_bar_again(
    store: CandleStore, batch: bool
) -> None:
    history, _ = _history(SID_1M)
    async with running_market(store) as market, connect(market.port) as ws:
        formings = await _stored(store, market.hub)
        forming = _forming(SID_1M, formings[SID_1M])
        await send(ws, subscribe_msg(SID_1M, since=history[-1].candle_time, batch=batch))
        assert await until_pong(ws) == [forming]
        # a chart that reloaded from an earlier bar: the bars after it, then the bar in progress
        await send(ws, subscribe_msg(SID_1M, since=history[6].candle_time, batch=batch))
        again = await until_pong(ws)
        assert closed_times(again) == [c.candle_time for c in history[7:]]
        assert again[-1] == forming
        # a newer update replaces the snapshot: the next subscriber gets that one
        newer = attrs.evolve(formings[SID_1M], close=Decimal("1"), low=Decimal("1"))
        market.hub.publish_forming(SID_1M, newer)
        assert await receive(ws) == _forming(SID_1M, newer)
        async with connect(market.port) as late:
            await send(late, subscribe_msg(SID_1M, since=history[-1].candle_time, batch=batch))
            assert await until_pong(late) == [_forming(SID_1M, newer)]


@pytest.mark.parametrize("closing", [0, 1], ids=["its_own_close", "a_later_close"])
async def test_a_close_at_or_above_the_remembered_bar_forgets_it_and_one_below_does_not(
    closing: int,
) -> None:
    bars = real_candles()[: HISTORY + 2]
    history, bar = bars[:HISTORY], bars[HISTORY]
    # a store behind the publishes: only the Hub's own rule keeps a closed bar back here
    hub = make_hub(MemoryReader(history))
    hub.publish_forming(SID_1M, bar)
    hub.publish_closed(SID_1M, history[-2:])  # closes below it: it is still forming
    first, second = FakeSocket(), FakeSocket()
    async with connected(hub, first) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, history[-1].candle_time, batch=True)
        assert await first.until_pong(subscriber) == [_forming(SID_1M, bar)]
    hub.publish_closed(SID_1M, [bars[HISTORY + closing]])
    async with connected(hub, second) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, history[-1].candle_time, batch=True)
        assert await second.until_pong(subscriber) == []


# --- on an edge: the Hub's forming bars come from the bus -------------------------------


class WatchedHub:
    """An edge's Hub as its feed sees it, telling the test what reached it."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub
        self.formings: list[tuple[str, Candle]] = []
        self.fives: list[int] = []
        self._changed = trio.Event()

    def _note(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def follows(self, series_id: str) -> bool:
        return self.hub.follows(series_id)

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        failures = self.hub.publish_closed(series_id, candles)
        if series_id == SID_5M:
            self.fives += [c.candle_time for c in candles]
            self._note()
        return failures

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        return self.hub.publish_system(event)

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        self.hub.publish_forming(series_id, candle)
        self.formings.append((series_id, candle))
        self._note()

    def corked(self) -> AbstractContextManager[None]:
        return self.hub.corked()

    async def until(self, done: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT_S):
            while not done():
                await self._changed.wait()


@pytest.mark.filterwarnings(_COREDIS_LEAK)  # as tests/bus/conftest.py says
async def test_an_edge_sends_the_forming_bar_its_feed_got_from_the_bus(
    redis_url: str, keys: StreamKeys, tmp_path: Path
) -> None:
    history = minutes(T0, 20)
    forming = minutes(T0 + 1200, 1)[0]
    forming5 = attrs.evolve(forming, volume=Decimal("3"))  # the 5m bar of that one minute
    async with publishing(redis_url, tmp_path, PublisherSettings(keys=keys)) as bus:
        store = bus.pipeline.store
        async with running_market(store) as market:
            edge = WatchedHub(market.hub)
            feed = edge_feed(redis_url, store, keys, series={SID_1M: None, SID_5M: None})
            await bus.nursery.start(feed.run, edge)
            await feed.wait_ready()
            await commit_and_publish(bus.pipeline, history)
            # nobody on the edge follows them yet: the feed passes the closes over, and hands
            # the forming bars on once past the closes before them
            bus.publisher.publish_forming(SID_1M, forming)
            bus.publisher.publish_forming(SID_5M, forming5)
            await edge.until(lambda: len(edge.formings) == 2)
            async with connect(market.port) as ws:
                await send(ws, subscribe_msg(SID_1M, since=history[-1].candle_time))
                await send(ws, subscribe_msg(SID_5M, since=None, batch=True))
                got = await until_pong(ws)
                assert _of(got, SID_1M) == [_forming(SID_1M, forming)]
                five = _of(got, SID_5M)
                assert closed_times(five) == [T0, T0 + 300, T0 + 600, T0 + 900]
                assert five[-1] == _forming(SID_5M, forming5)
                # its minute closes (and the 5m bar): the 1m closes are passed over again
                await send(ws, {"type": "unsubscribe", "series_id": SID_1M})
                assert await until_pong(ws) == []
                await commit_and_publish(bus.pipeline, minutes(T0 + 1200, 5))
                await edge.until(lambda: T0 + 1200 in edge.fives)
                assert closed_times(await until_pong(ws)) == [T0 + 1200]
            async with connect(market.port) as late:
                await send(late, subscribe_msg(SID_1M, since=history[-1].candle_time))
                await send(late, subscribe_msg(SID_5M, since=T0 + 900))
                got = await until_pong(late)
    # the remembered 1m bar's close was never published on this edge: the catch-up has it
    assert closed_times(_of(got, SID_1M)) == [T0 + 1200 + 60 * i for i in range(5)]
    assert closed_times(_of(got, SID_5M)) == [T0 + 1200]
    assert [m for m in got if m["type"] == "candle_forming"] == []


# --- the Hub, property-tested against what a chart ends with ------------------------------


@attrs.define
class Chart:
    """What the chart page keeps (static/chart.js): its bars by time, its newest close; a
    close or forming bar at or below that close is ignored, and a forming bar the daemon
    went past without closing is dropped."""

    bars: dict[int, dict[str, Any]] = attrs.Factory(dict)
    last_closed: int = -1

    def apply(self, message: dict[str, Any]) -> None:
        if message["type"] == "candles_batch":
            candles, closed = message["candles"], True
        elif message["type"] in ("candle_closed", "candle_forming"):
            candles, closed = [message["candle"]], message["type"] == "candle_closed"
        else:
            return
        for c in candles:
            t = c["candle_time"]
            if t <= self.last_closed:
                continue
            newest = max(self.bars, default=-1)
            if self.last_closed < newest < t:
                del self.bars[newest]  # never closed: never stored
            if closed:
                self.last_closed = t
            self.bars[t] = c


@attrs.define
class Flow:
    """Commits and publishes 1m bars as ingest does (commit first, publish after), and the
    forming bar of the next minute; remembers the newest forming bar not closed since."""

    reader: MemoryReader
    hub: Hub
    next_time: int = T0
    held: list[Candle] = attrs.Factory(list)
    forming: Candle | None = None
    updates: int = 0

    @property
    def head(self) -> int:
        stored = self.reader.candles[SID_1M]
        return stored[-1].candle_time if stored else -1

    def _commit(self, count: int) -> list[Candle]:
        made = list(flat_minutes(self.next_time, count, price=str(100 + self.next_time % 7)))
        self.next_time += 60 * count
        self.reader.candles[SID_1M].extend(made)
        return made

    def _publish(self, candles: list[Candle]) -> None:
        forming = self.forming
        if candles and forming is not None and candles[-1].candle_time >= forming.candle_time:
            self.forming = None
        self.hub.publish_closed(SID_1M, candles)

    def run(self, kind: str, n: int) -> None:
        if kind == "publish":
            self._publish(self._commit(n))
        elif kind == "commit":  # its publish is late
            self.held += self._commit(n)
        elif kind == "publish_late":
            self._publish(self.held)
            self.held = []
        elif kind == "skip":  # minutes missing at the exchange
            self.next_time += 60 * n
        elif kind == "forming":  # each update differs: a repeat would show
            self.updates += 1
            price = str(200 + self.updates)
            self.forming = next(iter(flat_minutes(self.next_time, 1, price=price)))
            self.hub.publish_forming(SID_1M, self.forming)


FLOW_OPS: Final = st.one_of(
    st.tuples(st.just("publish"), st.integers(1, 3)),
    st.tuples(st.just("commit"), st.integers(1, 2)),
    st.tuples(st.just("publish_late"), st.just(0)),
    st.tuples(st.just("skip"), st.integers(1, 2)),
    st.tuples(st.just("forming"), st.just(0)),
    st.tuples(st.just("subscribe"), st.sampled_from(["null", "head", "older", "above"])),
    st.tuples(st.just("yield"), st.integers(1, 3)),
    st.tuples(st.just("settle"), st.just(0)),
)
CLIENTS: Final = 3


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(FLOW_OPS, max_size=24), batch=st.booleans(), limit=st.sampled_from([2, 500]))
async def test_every_subscriber_ends_with_the_bar_in_progress_and_nothing_out_of_order(
    ops: list[tuple[str, Any]], batch: bool, limit: int
) -> None:
    reader = MemoryReader()
    hub = make_hub(reader, catchup_limit=limit)
    flow = Flow(reader, hub)
    sockets = [FakeSocket() for _ in range(CLIENTS)]
    # each client subscribes once, in turn: (its since, the store's head then)
    sinces: list[int | None] = []
    async with AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(connected(hub, s)) for s in sockets]
        for kind, arg in ops:
            if kind == "subscribe":
                if len(sinces) < CLIENTS:
                    head = flow.head if flow.head >= 0 else None
                    since = {
                        "null": None,
                        "head": head,
                        "older": None if head is None else head - 180,
                        "above": flow.next_time + 120,
                    }[arg]
                    hub.subscribe(clients[len(sinces)], SERIES_1M, since, batch)
                    sinces.append(since)
            elif kind == "yield":
                for _ in range(arg):
                    await trio.lowlevel.checkpoint()
            elif kind == "settle":
                await settled()
            else:
                flow.run(kind, arg)
        flow.run("publish_late", 0)
        await settled()
    stored = [c.candle_time for c in reader.candles[SID_1M]]
    for sent, since in zip(sockets, sinces, strict=False):
        times = closed_times(sent.sent)
        assert times == sorted(set(times)), "duplicate or out of order"
        if since is not None:
            assert times == [t for t in stored if t > since]
        else:
            assert times == stored[len(stored) - len(times) :]
        cursor = -1 if since is None else since
        for m in sent.sent:
            if m["type"] == "candle_forming":
                assert m["candle"]["candle_time"] > cursor, "a forming bar at the cursor"
            cursor = max([cursor, *closed_times([m])])
        assert _overtaken(sent.sent) == []
        assert all(
            not (a["type"] == b["type"] == "candle_forming" and a == b)
            for a, b in itertools.pairwise(sent.sent)
        ), "the same forming bar twice in a row"
        chart = Chart()
        for m in sent.sent:
            chart.apply(m)
        top = max(flow.head, -1 if since is None else since)
        above = [bar for t, bar in sorted(chart.bars.items()) if t > top]
        bar = flow.forming
        assert above == ([bar.to_wire()] if bar is not None and bar.candle_time > top else [])
