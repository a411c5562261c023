"""The replay side's clock: an extra replay client in the driver process that records the
wall-clock time (``time.time()``) at which each closed kline frame arrives.

The replay writes each frame to every connected client in turn (each client's own task
writes its socket), so this arrival time is the frame's send time plus one loopback hop —
the same hop the daemon's own reader has. Like the subscribers' (``bench.clients``), it is
stamped by the connection's reader as it parses the read that brought the frame. Latencies
measured from it are therefore slightly *under* "frame sent → received" by that hop (tens
of µs on an idle core, more when the cores are busy); docs/benchmarks.md says so.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import orjson
import trio

from bench.clients import arrival, stamp_at_read
from tradecanvas.upstream.ws_client import get_message_nowait, open_websocket_client

GROUP: Final = 200
# frames trio-websocket's reader queues for us: every frame of one socket read at once
# (``queue_at_once``), taken in one go
QUEUE: Final = 256


class Observer:
    """Close frames seen: (stream, open time in seconds) → arrival time."""

    def __init__(self) -> None:
        self.closes: dict[tuple[str, int], float] = {}

    async def run(
        self, replay_ws: str, streams: Sequence[str], *, task_status: trio.TaskStatus[None]
    ) -> None:
        names = sorted(streams)
        async with trio.open_nursery() as nursery:
            for i in range(0, len(names), GROUP):
                url = f"{replay_ws}/stream?streams={'/'.join(names[i : i + GROUP])}"
                await nursery.start(self._read, url)
            task_status.started()

    async def _read(self, url: str, *, task_status: trio.TaskStatus[None]) -> None:
        async with open_websocket_client(
            url,
            max_message_size=2**20,
            message_queue_size=QUEUE,
            queue_at_once=True,
            fast_frames=True,
        ) as ws:
            stamps = stamp_at_read(ws)
            task_status.started()
            closes = self.closes
            while True:
                text = await ws.get_message()
                while True:
                    now = arrival(stamps, text)
                    doc = orjson.loads(text)
                    k = doc["data"]["k"]
                    if k["x"]:
                        closes.setdefault((doc["stream"], k["t"] // 1000), now)
                    try:  # the rest of what the reader queued, without a scheduler round each
                        text = get_message_nowait(ws)
                    except trio.WouldBlock:
                        break
