"""The benchmark's subscriber process (``bench.clients``) against a real WebSocket server."""

from __future__ import annotations

import time

import orjson
import trio
import trio_websocket

from bench.clients import _Run, arrival, stamp_at_read
from tradecanvas.upstream.ws_client import open_websocket_client

LAST = 120


async def _serve(request: trio_websocket.WebSocketRequest) -> None:
    ws = await request.accept()
    series: list[str] = []
    while True:
        message = orjson.loads(await ws.get_message())
        if message["type"] == "ping":
            break
        series.append(message["series_id"])
    await ws.send_message('{"type":"pong"}')
    closes = series[0] == "s0"  # the first client's connection is closed before the end
    if not closes:
        await ws.send_message('{"type":"error","message":"late"}')
    times = [60] if closes else [60, LAST]
    for sid in series:
        candles = [{"candle_time": t} for t in times]
        batch = {"type": "candles_batch", "series_id": sid, "candles": candles}
        await ws.send_message(orjson.dumps(batch).decode())
    if closes:
        await ws.aclose(reason="bye")
    else:
        await trio.sleep_forever()


async def test_clients_record_deliveries_and_end_without_waiting_for_close_handshakes() -> None:
    with trio.fail_after(1.5):  # under the 2 s close timeout of one client
        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                trio_websocket.serve_websocket, _serve, "127.0.0.1", 0, None
            )
            plan = {
                "url": f"ws://127.0.0.1:{server.port}/ws/market",
                "clients": [["s0", "s1"], ["s2", "s3"]],
                "since": None,
                "last_time": LAST,
                "concurrency": 1,
            }
            run = _Run(plan)
            async with trio.open_nursery() as clients:
                for series in run.clients:
                    clients.start_soon(run.client, series)
                await run.all_ready.wait()
                await run.all_done.wait()
                clients.cancel_scope.cancel()  # as the process does at the end: s2/s3 still open
            nursery.cancel_scope.cancel()
    got = sorted((sid, t) for _, sid, t in run.deliveries)
    assert got == [("s0", 60), ("s1", 60), ("s2", 60), ("s2", LAST), ("s3", 60), ("s3", LAST)]
    assert run.done == 2
    closed = "closed: CloseReason<code=1000, name=NORMAL_CLOSURE, reason=bye>"
    assert sorted(run.errors) == sorted([closed, '{"type":"error","message":"late"}'])
    assert run.messages == 3 + 4  # pong and a batch a series each, and s2/s3's error


async def test_messages_are_stamped_at_their_read_the_slow_path_ones_when_taken() -> None:
    """Fast-path texts carry the time their read was parsed (no later than when the client
    takes them); a text over 64 KiB goes by wsproto's path, is not stamped, and takes the
    time it is taken — the stamps after it still match their own texts."""
    big = "x" * 70_000
    texts = ["a", big, "c", "d"]

    async def serve(request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        for text in texts:
            await ws.send_message(text)
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        server = await nursery.start(trio_websocket.serve_websocket, serve, "127.0.0.1", 0, None)
        url = f"ws://127.0.0.1:{server.port}/"
        async with open_websocket_client(
            url, max_message_size=2**20, message_queue_size=16, queue_at_once=True, fast_frames=True
        ) as ws:
            stamps = stamp_at_read(ws)
            got: list[tuple[str | bytes, float, float]] = []
            while len(got) < len(texts):
                text = await ws.get_message()
                stamped = bool(stamps) and stamps[0][0] is text
                got.append((text, arrival(stamps, text), time.time()))
                assert stamped == (text != big)
        nursery.cancel_scope.cancel()
    assert [text for text, _, _ in got] == texts
    assert all(at <= taken for _, at, taken in got)
    assert not stamps
