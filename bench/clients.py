"""``python -m bench.clients PLAN OUT``: the subscribers of a benchmark, in their own process.

PLAN (JSON): ``url``; ``clients``, one list of series ids per client (one connection each);
``since`` (the cursor of every subscription); ``last_time``: the process ends once every
client has received that closed ``candle_time`` on each of its series (null: only on
``stop``); ``concurrency``: handshakes in flight at once.

Each client subscribes (``supports_batch``), sends ``ping`` and waits for the ``pong``:
then it is registered and caught up. ``clients ready`` is printed when all are. Every closed
candle received is recorded with the wall-clock time (``time.time()``, the clock every
process on this machine shares) at which its message came off the socket: stamped by the
connection's reader as it parses the read (:func:`stamp_at_read`), not when this process's
client task gets to the message — in between are the other connections' reads and parsing
and a task switch, this process's own cost (about 1.5 ms of a 50-client burst's median,
measured), which used to count as latency of every system alike. A line ``stop``
on stdin also ends it. OUT (JSON): ``deliveries`` ([time, series id, candle_time], in
arrival order per client), ``messages``, ``errors``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any, Final

import orjson
import trio
import trio_websocket

from tradecanvas.upstream.ws_client import get_message_nowait, open_websocket_client
from tradecanvas.upstream.ws_frames import FastTextFrames

MAX_MESSAGE: Final = 64 * 2**20
# messages trio-websocket's reader queues for a client: the reader queues every message of
# one socket read at once (``queue_at_once``), the client takes them all in one go
QUEUE: Final = 64
# a client closed before its pong connects again this many times in all (Run.client)
READY_TRIES: Final = 5
DONE_TIMEOUT_S: Final = 600.0


def stamp_at_read(ws: trio_websocket.WebSocketConnection) -> collections.deque[tuple[str, float]]:
    """Have ``ws``'s reader (opened with ``fast_frames`` and ``queue_at_once``) note the
    time each fast-path text is queued, right after the socket read that brought it: the
    deque holds (text, time) in queue order; :func:`arrival` takes a text's time from it."""
    frames = ws._wsproto
    offer = frames.delivering if isinstance(frames, FastTextFrames) else None
    if offer is None or not isinstance(frames, FastTextFrames):
        raise ValueError("stamp_at_read needs fast_frames and queue_at_once")
    stamps: collections.deque[tuple[str, float]] = collections.deque()

    def stamped(text: str) -> bool:
        if not offer(text):
            return False
        stamps.append((text, time.time()))
        return True

    frames.deliver_to(stamped)
    return stamps


def arrival(stamps: collections.deque[tuple[str, float]], text: str | bytes) -> float:
    """The read time of ``text``, the next message taken from the queue: its stamp, or now
    for one the reader queued by the slow path (never stamped; not a kline or a candle)."""
    if stamps and stamps[0][0] is text:
        return stamps.popleft()[1]
    return time.time()


class _Run:
    def __init__(self, plan: dict[str, Any]) -> None:
        self.url: str = plan["url"]
        self.clients: list[list[str]] = plan["clients"]
        self.since: int | None = plan.get("since")
        self.last_time: int | None = plan.get("last_time")
        self.handshakes = trio.Semaphore(int(plan.get("concurrency", 50)))
        self.deliveries: list[tuple[float, str, int]] = []
        self.messages = 0
        self.errors: list[str] = []
        self.ready = 0
        self.all_ready = trio.Event()
        self.done = 0
        self.all_done = trio.Event()

    def _client_done(self) -> None:
        self.done += 1
        if self.done == len(self.clients):
            self.all_done.set()

    async def client(self, series: list[str]) -> None:
        """One client: subscribes, pings, reads. A client closed before its pong (the
        daemon cut it as a slow consumer while this process was busy with the others'
        handshakes) connects again, as a real one would, at most READY_TRIES times: else
        the whole run waited for a client that never became ready."""
        for _ in range(READY_TRIES):
            async with contextlib.AsyncExitStack() as stack:
                async with self.handshakes:
                    ws = await stack.enter_async_context(
                        open_websocket_client(
                            self.url,
                            max_message_size=MAX_MESSAGE,
                            message_queue_size=QUEUE,
                            queue_at_once=True,
                            fast_frames=True,
                        )
                    )
                    for sid in series:
                        subscribe = {"type": "subscribe", "series_id": sid, "since": self.since,
                                     "supports_batch": True}  # fmt: skip
                        await ws.send_message(orjson.dumps(subscribe).decode())
                    await ws.send_message('{"type":"ping"}')
                if await self._receive(ws, series, stamp_at_read(ws)):
                    return

    async def _receive(
        self,
        ws: trio_websocket.WebSocketConnection,
        series: list[str],
        stamps: collections.deque[tuple[str, float]],
    ) -> bool:
        """Read until the connection ends; False when it ended before the pong (try again)."""
        waiting = {sid: True for sid in series} if self.last_time is not None else {}
        pending = len(waiting)
        pong = False
        deliveries = self.deliveries
        try:
            while True:
                text = await ws.get_message()
                while True:
                    now = arrival(stamps, text)
                    self.messages += 1
                    message = orjson.loads(text)
                    kind = message["type"]
                    candles = None
                    if kind == "candles_batch":
                        candles = message["candles"]
                    elif kind == "candle_closed":
                        candles = [message["candle"]]
                    elif kind == "pong" and not pong:
                        pong = True
                        self.ready += 1
                        if self.ready == len(self.clients):
                            self.all_ready.set()
                    elif kind == "error":
                        self.errors.append(str(text))
                    if candles is not None:
                        sid = message["series_id"]
                        for candle in candles:
                            t = candle["candle_time"]
                            deliveries.append((now, sid, t))
                            if pending and t == self.last_time and waiting.get(sid):
                                waiting[sid] = False
                                pending -= 1
                                if not pending:
                                    self._client_done()
                    try:  # the rest of what the reader queued, without a scheduler round each
                        text = get_message_nowait(ws)
                    except trio.WouldBlock:
                        break
        except trio_websocket.ConnectionClosed as exc:
            self.errors.append(f"closed: {exc.reason}")
            if not pong:
                return False
            if pending:
                self._client_done()
        return True


async def _read_stop(stop: trio.Event) -> None:
    while True:
        line = await trio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True)
        if not line or line.strip() == "stop":
            stop.set()
            return


async def _main(plan: dict[str, Any], out: Path) -> None:
    run = _Run(plan)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_read_stop, stop)
        for series in run.clients:
            nursery.start_soon(run.client, series)
        await run.all_ready.wait()
        sys.stdout.write(f"clients ready {len(run.clients)}\n")
        sys.stdout.flush()

        async def until_done() -> None:
            if run.last_time is None:
                await trio.sleep_forever()
            await run.all_done.wait()
            stop.set()

        nursery.start_soon(until_done)
        with trio.move_on_after(DONE_TIMEOUT_S):
            await stop.wait()
        nursery.cancel_scope.cancel()
    doc = {"deliveries": run.deliveries, "messages": run.messages, "errors": run.errors[:50],
           "error_count": len(run.errors), "done": run.done}  # fmt: skip
    out.write_text(json.dumps(doc))
    sys.stdout.write(f"clients finished done={run.done} messages={run.messages}\n")
    sys.stdout.flush()


def main() -> None:
    plan = json.loads(Path(sys.argv[1]).read_text())
    trio.run(_main, plan, Path(sys.argv[2]))


if __name__ == "__main__":
    main()
