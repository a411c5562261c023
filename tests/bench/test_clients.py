"""The benchmark's subscriber process (``bench.clients``) against a real WebSocket server."""

from __future__ import annotations

import orjson
import trio
import trio_websocket

from bench.clients import _Run

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
