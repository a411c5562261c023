"""The /ws/market session over both ports (DESIGN §3, §6, §10): every message type on the
wire, catch-up then live exactly once, refusals, Origin 403 and 404, 1009, the rate limit's
1008, shutdown 1001, client closes, resuming events by cursor.

Each test runs once with the client on the WS port (trio-websocket) and once on the HTTP
port (Starlette under Hypercorn): the same Hub, endpoint and session, so the same answers.
Real trio-websocket clients, real servers on 127.0.0.1 port 0, a real SQLite store; the
rules themselves are tested without sockets in tests/serve/test_ws_protocol.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import attrs
import pytest
import trio
import trio_websocket

from tests.pipeline.test_commit import RecordingTarget
from tests.serve.test_ws_protocol import BAD_MESSAGES
from tests.serve.test_ws_server import (
    RECEIVE_TIMEOUT_S,
    SERIES_1M,
    SID_1M,
    SID_5M,
    TRANSPORTS,
    Market,
    close_code_of,
    closed_times,
    connect,
    handshake_rejection,
    real_candles,
    receive,
    running_market,
    send,
    subscribe_msg,
    subscription_count,
    until_pong,
)
from tradecanvas.model import Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.serve.ws_protocol import MAX_MESSAGE_BYTES, InboundLimits
from tradecanvas.store.sqlite import CandleStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    opened = await CandleStore.open(tmp_path / "market.sqlite3")
    yield opened
    await opened.aclose()


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_round_trip_of_every_message_type(store: CandleStore, over: str) -> None:
    minutes = real_candles("1m")[:12]
    fives = real_candles("5m")[:2]
    await store.upsert(SID_1M, minutes[:10], "ws")
    await store.upsert(SID_5M, fives[:1], "derived")
    t = [c.candle_time for c in minutes]
    async with (
        running_market(store, over=over) as market,
        connect(market.port) as ws,
    ):
        # subscribe (batch) → candles_batch; subscribe (plain) → candle_closed
        await send(ws, subscribe_msg(SID_1M, since=t[7], batch=True))
        await send(ws, subscribe_msg(SID_5M, since=None, batch=False))
        caught_up = await until_pong(ws)
        assert caught_up[0] == {
            "type": "candles_batch",
            "series_id": SID_1M,
            "candles": [minutes[8].to_wire(), minutes[9].to_wire()],
        }
        assert caught_up[1] == {
            "type": "candle_closed",
            "series_id": SID_5M,
            "candle": fives[0].to_wire(),
        }
        assert len(caught_up) == 2
        # candle_forming
        market.hub.publish_forming(SID_1M, minutes[10])
        assert await receive(ws) == {
            "type": "candle_forming",
            "series_id": SID_1M,
            "candle": minutes[10].to_wire(),
        }
        # gap: the store has no minute 10 either, so minute 11 comes after a gap
        await store.upsert(SID_1M, [minutes[11]], "ws")
        assert market.hub.publish_closed(SID_1M, [minutes[11]]) == []
        assert await receive(ws) == {
            "type": "gap",
            "series_id": SID_1M,
            "expected_next_time": t[10],
            "actual_time": t[11],
        }
        assert closed_times([await receive(ws)]) == [t[11]]
        # system
        event = SystemEvent(SID_1M, "backfill", t[10], t[10])
        market.hub.publish_system(event)
        assert await receive(ws) == event.to_wire()
        # error, then unsubscribe, then pong
        await send(ws, {"type": "subscribe"})
        error = await receive(ws)
        assert error["type"] == "error" and error["code"] == "bad_request"
        await send(ws, {"type": "unsubscribe", "series_id": SID_1M})
        assert await until_pong(ws) == []
        market.hub.publish_forming(SID_1M, minutes[11])
        market.hub.publish_forming(SID_5M, fives[1])
        assert (await receive(ws))["series_id"] == SID_5M


# every bad message's parsing is tests/serve/test_ws_protocol.py's; a sample of kinds here
BAD_ON_THE_WIRE: Final = [
    m for m in BAD_MESSAGES if m[1] in ("not valid JSON", "got a JSON array", "got a boolean true")
]


@pytest.mark.parametrize(("raw", "says"), BAD_ON_THE_WIRE)
@pytest.mark.parametrize("over", TRANSPORTS)
async def test_bad_messages_get_an_error_and_the_connection_stays_up(
    store: CandleStore, over: str, raw: str | bytes, says: str
) -> None:
    async with (
        running_market(store, over=over) as market,
        connect(market.port) as ws,
    ):
        await send(ws, raw)
        error = await receive(ws)
        assert error["type"] == "error"
        assert error["code"] == "bad_request"
        assert says in error["message"]
        await send(ws, subscribe_msg(SID_1M))
        assert await until_pong(ws) == []
        assert subscription_count(market.hub) == 1


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_unknown_series_and_too_many_subscriptions(store: CandleStore, over: str) -> None:
    eth = "binance:futures:ETH/USDT:1m"
    async with (
        running_market(store, over=over, max_subscriptions=1) as market,
        connect(market.port) as ws,
    ):
        for request in (subscribe_msg(eth), {"type": "unsubscribe", "series_id": eth}):
            await send(ws, request)
            error = await receive(ws)
            assert error["code"] == "unknown_series" and error["series_id"] == eth
            assert "not ingested or derived" in error["message"]
            assert "served: binance:futures:BTC/USDT, each in its timeframes" in error["message"]
        await send(ws, subscribe_msg(SID_1M))
        await send(ws, subscribe_msg(SID_1M, since=5))  # a replacement is not one more
        await send(ws, subscribe_msg(SID_5M))
        error = await receive(ws)
        assert error["code"] == "too_many_subscriptions" and error["series_id"] == SID_5M
        assert "at most 1 subscriptions" in error["message"]
        await send(ws, {"type": "unsubscribe", "series_id": SID_1M})
        await send(ws, subscribe_msg(SID_5M))
        assert await until_pong(ws) == []
        (subscriber,) = market.hub.subscribers()
        cursors = {sid: sub.cursor for sid, sub in subscriber.queue.subscriptions.items()}
        assert cursors == {SID_5M: -1}


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_subscribing_again_replaces_the_cursor(store: CandleStore, over: str) -> None:
    minutes = real_candles()[:6]
    await store.upsert(SID_1M, minutes, "ws")
    t = [c.candle_time for c in minutes]
    async with (
        running_market(store, over=over) as market,
        connect(market.port) as ws,
    ):
        await send(ws, subscribe_msg(SID_1M, since=t[3]))
        assert closed_times(await until_pong(ws)) == t[4:]
        await send(ws, subscribe_msg(SID_1M, since=t[1], batch=True))
        again = await until_pong(ws)
        assert [m["type"] for m in again] == ["candles_batch"]
        assert closed_times(again) == t[2:]


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_other_paths_get_404_and_bad_origins_403(store: CandleStore, over: str) -> None:
    async with running_market(store, over=over) as market:
        # on the HTTP port, a WebSocket to an HTTP route's path is no upgrade either
        for path in ("/", "/ws", "/ws/market/x", "/api/market/candles"):
            rejected = await handshake_rejection(market.port, path)
            assert rejected.status_code == 404
            assert rejected.body is not None and b"/ws/market" in rejected.body
        for origin in (b"http://evil.example", b"null", b"http://localhost.evil.example"):
            rejected = await handshake_rejection(market.port, "/ws/market", origin)
            assert rejected.status_code == 403
        for allowed in (b"http://localhost:5173", b"https://127.0.0.1"):
            async with connect(market.port, path="/ws/market?client=chart", origin=allowed) as ws:
                assert await until_pong(ws) == []
        assert market.hub.statistics().subscribers <= 2


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_star_allows_any_origin(store: CandleStore, over: str) -> None:
    async with (
        running_market(store, over=over, allowed_origins=["*"]) as market,
        connect(market.port, origin=b"https://charts.example") as ws,
    ):
        assert await until_pong(ws) == []


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_a_message_over_64_kib_closes_with_1009_and_others_carry_on(
    store: CandleStore,
    over: str,
) -> None:
    async with (
        running_market(store, over=over) as market,
        connect(market.port) as other,
        connect(market.port) as ws,
    ):
        # exactly the limit is still a message (and gets an answer)
        await send(ws, " " * (MAX_MESSAGE_BYTES - 2) + "{}")
        assert (await receive(ws))["code"] == "bad_request"
        await send(ws, '{"type":"ping","pad":"' + "x" * MAX_MESSAGE_BYTES + '"}')
        assert await close_code_of(ws) == 1009
        assert await until_pong(other) == []
        await market.hub.wait_subscribers(1)
        text = market.metrics.render().decode()
        assert 'tradecanvas_subscriber_disconnects_total{reason="message_too_big"} 1.0' in text


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_rate_limit_answers_rate_limited_then_closes_1008(
    store: CandleStore, over: str
) -> None:
    limits = InboundLimits(messages_per_s=5, burst=10, abuse_after_s=0.3)
    async with (
        running_market(store, over=over, limits=limits) as market,
        connect(market.port) as ws,
    ):
        for _ in range(15):
            await send(ws, {"type": "ping"})
        # the burst goes through; the first refused one is answered, the others are
        # ignored (a token may come back while the 15 are sent: another pong)
        answers = [await receive(ws) for _ in range(11)]
        assert answers[:10] == [{"type": "pong"}] * 10
        while answers[-1]["type"] == "pong":
            answers.append(await receive(ws))
        assert answers[-1]["code"] == "rate_limited"
        assert "at most 5/s" in answers[-1]["message"]
        # keep flooding: after 0.3 s over the limit the server closes with 1008
        got: list[int | None] = []

        async def read_until_closed() -> None:
            got.append(await close_code_of(ws))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_until_closed)
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                try:
                    while not got:
                        await send(ws, {"type": "ping"})
                except trio_websocket.ConnectionClosed:
                    pass
        assert got == [1008]
        await market.hub.wait_subscribers(0)
        text = market.metrics.render().decode()
        assert 'tradecanvas_subscriber_disconnects_total{reason="rate_limited"} 1.0' in text


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_binary_frames_are_json_too(store: CandleStore, over: str) -> None:
    async with (
        running_market(store, over=over) as market,
        connect(market.port) as ws,
    ):
        await send(ws, b'{"type":"ping"}')
        assert await receive(ws) == {"type": "pong"}


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_shutdown_closes_every_subscriber_with_1001(store: CandleStore, over: str) -> None:
    metrics_holder: list[Market] = []
    codes: list[int | None] = []
    async with trio.open_nursery() as clients, running_market(store, over=over) as market:
        metrics_holder.append(market)

        ready: list[None] = []
        all_ready = trio.Event()

        async def client() -> None:
            async with connect(market.port) as ws:
                await send(ws, subscribe_msg())
                await until_pong(ws)
                ready.append(None)
                if len(ready) == 3:
                    all_ready.set()
                codes.append(await close_code_of(ws))

        for _ in range(3):
            clients.start_soon(client)
        await all_ready.wait()
        # leaving running_market shut the endpoint down, as the daemon does
    assert codes == [1001, 1001, 1001]
    market = metrics_holder[0]
    assert market.hub.statistics().subscribers == 0
    text = market.metrics.render().decode()
    assert 'tradecanvas_subscriber_disconnects_total{reason="shutdown"} 3.0' in text
    assert "tradecanvas_subscribers 0.0" in text


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_client_close_is_counted_and_frees_the_subscriber(
    store: CandleStore, over: str
) -> None:
    async with running_market(store, over=over) as market:
        async with connect(market.port) as ws:
            await send(ws, subscribe_msg())
            await until_pong(ws)
            assert subscription_count(market.hub) == 1
        await market.hub.wait_subscribers(0)
        assert subscription_count(market.hub) == 0
        text = market.metrics.render().decode()
        assert 'tradecanvas_subscriber_disconnects_total{reason="client_closed"} 1.0' in text
        # nothing is reported for a clean close
        assert market.hub.publish_closed(SID_1M, real_candles()[:1]) == []


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_events_resume_by_cursor_across_a_restart(tmp_path: Path, over: str) -> None:
    """Stored events after ``events_after`` come first, in order, then live ones; a reopened
    store (a restarted daemon) keeps ids and events; an old cursor is told it is truncated."""
    path = tmp_path / "events.sqlite3"
    store = await CandleStore.open(path)
    pipeline = IngestPipeline(store, RecordingTarget(), [Timeframe.parse("5m")], "fp")
    minutes = list(real_candles())
    first = await pipeline.run(IngestBatch.of(SERIES_1M, minutes[:10], "ws"))
    revised = [attrs.evolve(minutes[3], volume=minutes[3].volume + 1)]
    second = await pipeline.run(IngestBatch.of(SERIES_1M, revised, "rest"))
    await store.aclose()
    store = await CandleStore.open(path)  # the daemon restarted
    try:
        ids = [e.event_id for e in (*first.events, *second.events) if e.series_id == SID_1M]
        async with running_market(store, over=over) as market, connect(market.port) as ws:
            await send(
                ws, subscribe_msg(SID_1M, since=minutes[9].candle_time) | {"events_after": 0}
            )
            got = await until_pong(ws)
            assert [m["event_id"] for m in got if m["type"] == "system"] == ids
            assert [m["data"]["reason"] for m in got if m["type"] == "system"] == [
                "new_series",
                "revision",
            ]
            # the cursor resumes after the first: only the second comes again
            await send(
                ws, subscribe_msg(SID_1M, since=minutes[9].candle_time) | {"events_after": ids[0]}
            )
            again = await until_pong(ws)
            assert [m["event_id"] for m in again if m["type"] == "system"] == ids[1:]
            # a malformed cursor is refused and changes nothing
            await send(ws, subscribe_msg(SID_1M) | {"events_after": "x"})
            refused = await receive(ws)
            assert refused["type"] == "error" and "events_after" in refused["message"]
    finally:
        await store.aclose()


@pytest.mark.parametrize("over", TRANSPORTS)
async def test_catch_up_then_live_exactly_once_while_candles_flow(
    store: CandleStore, over: str
) -> None:
    """Candles are committed and published (in that order, as ingest does) all the while a
    client subscribes with a cursor in the stored history: it gets every one after the
    cursor once, in order, however the catch-up read and the live publishes interleave."""
    minutes = list(real_candles()[:400])
    await store.upsert(SID_1M, minutes[:200], "ws")
    since = minutes[49].candle_time
    async with running_market(store, over=over, catchup_limit=30) as market:
        received: list[int] = []

        async def feed() -> None:
            for start in range(200, 400, 4):
                chunk = minutes[start : start + 4]
                await store.upsert(SID_1M, chunk, "ws")
                assert market.hub.publish_closed(SID_1M, chunk) == []
                await trio.lowlevel.checkpoint()

        async with connect(market.port) as ws, trio.open_nursery() as nursery:
            await send(ws, subscribe_msg(SID_1M, since=since, batch=True))
            nursery.start_soon(feed)
            with trio.fail_after(RECEIVE_TIMEOUT_S):
                while not received or received[-1] < minutes[-1].candle_time:
                    received.extend(closed_times([await receive(ws)]))
            assert await until_pong(ws) == []
    assert received == [c.candle_time for c in minutes[50:]]
