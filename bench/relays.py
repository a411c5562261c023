"""``python -m bench.relays naive|raw REPLAY_WS STREAMS``: the baselines of the burst.

Both connect to the replay as the daemon does (combined streams, ≤200 a connection; the
readers feed one bounded channel, one relay task takes from it), serve ``/ws/market``
subscribers speaking the daemon's protocol (``subscribe`` … ``ping`` → ``pong``), and for
each closed kline parse the frame and encode one ``candle_closed`` message, once:

- ``naive``: awaits each subscriber's ``send_message`` in turn (trio-websocket frames the
  message for every socket);
- ``raw``: frames the message once (an unmasked text frame, RFC 6455) and writes the same
  bytes straight to every subscriber's socket, in turn — the transport's ceiling.

STREAMS (JSON) maps each stream name to its series id. No store, no ordering or recovery:
what a relay that only relays costs. Prints ``relay ws=… upstream connected`` when ready.
"""

from __future__ import annotations

import functools
import json
import struct
import sys
from pathlib import Path
from typing import Final

import orjson
import trio
import trio_websocket

GROUP: Final = 200
# frames queued between the upstream readers and the relay task
FRAMES_BUFFER: Final = 4096
MAX_MESSAGE: Final = 2**20


def text_frame(payload: bytes) -> bytes:
    """One unmasked, unfragmented text frame (server → client)."""
    n = len(payload)
    if n < 126:
        header = struct.pack("!BB", 0x81, n)
    elif n < 2**16:
        header = struct.pack("!BBH", 0x81, 126, n)
    else:
        header = struct.pack("!BBQ", 0x81, 127, n)
    return header + payload


class _Subscriber:
    __slots__ = ("stream", "ws")

    def __init__(self, ws: trio_websocket.WebSocketConnection) -> None:
        self.ws = ws
        # the connection's transport, for the raw relay's writes (trio-websocket sends
        # nothing itself once the handshake is done: the clients never ping)
        self.stream: trio.abc.Stream = ws._stream


class Relay:
    def __init__(self, kind: str, streams: dict[str, str]) -> None:
        self.raw = kind == "raw"
        self.streams = streams
        self.subs: dict[str, list[_Subscriber]] = {sid: [] for sid in streams.values()}

    async def handle(self, request: trio_websocket.WebSocketRequest) -> None:
        ws = await request.accept()
        me = _Subscriber(ws)
        mine: list[str] = []
        try:
            while True:
                message = orjson.loads(await ws.get_message())
                if message.get("type") == "subscribe" and message.get("series_id") in self.subs:
                    mine.append(message["series_id"])
                elif message.get("type") == "ping":
                    await ws.send_message('{"type":"pong"}')
                    break
            for sid in mine:
                self.subs[sid].append(me)
            while True:
                await ws.get_message()
        except trio_websocket.ConnectionClosed:
            pass
        finally:
            for sid in mine:
                if me in self.subs[sid]:
                    self.subs[sid].remove(me)

    async def relay(self, frames: trio.MemoryReceiveChannel[str]) -> None:
        async for text in frames:
            doc = orjson.loads(text)
            k = doc["data"]["k"]
            if not k["x"]:
                continue
            sid = self.streams[doc["stream"]]
            payload = orjson.dumps(
                {
                    "type": "candle_closed",
                    "series_id": sid,
                    "candle": {
                        "candle_time": k["t"] // 1000,
                        "open": float(k["o"]),
                        "high": float(k["h"]),
                        "low": float(k["l"]),
                        "close": float(k["c"]),
                        "volume": float(k["v"]),
                    },
                }
            )
            if self.raw:
                frame = text_frame(payload)
                for sub in list(self.subs[sid]):
                    try:
                        await sub.stream.send_all(frame)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        self._drop(sid, sub)
            else:
                message = payload.decode()
                for sub in list(self.subs[sid]):
                    try:
                        await sub.ws.send_message(message)
                    except trio_websocket.ConnectionClosed:
                        self._drop(sid, sub)

    def _drop(self, sid: str, sub: _Subscriber) -> None:
        if sub in self.subs[sid]:
            self.subs[sid].remove(sub)


async def _upstream(
    url: str, frames: trio.MemorySendChannel[str], *, task_status: trio.TaskStatus[None]
) -> None:
    async with trio_websocket.open_websocket_url(url, max_message_size=MAX_MESSAGE) as ws:
        task_status.started()
        while True:
            message = await ws.get_message()
            await frames.send(message if isinstance(message, str) else message.decode())


async def _main(kind: str, replay_ws: str, streams: dict[str, str]) -> None:
    relay = Relay(kind, streams)
    send, receive = trio.open_memory_channel[str](FRAMES_BUFFER)
    names = sorted(streams)
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            functools.partial(
                trio_websocket.serve_websocket, relay.handle, "127.0.0.1", 0, None,
                max_message_size=MAX_MESSAGE,
            )
        )  # fmt: skip
        nursery.start_soon(relay.relay, receive)
        for i in range(0, len(names), GROUP):
            url = f"{replay_ws}/stream?streams={'/'.join(names[i : i + GROUP])}"
            await nursery.start(_upstream, url, send)
        sys.stdout.write(f"relay ws=ws://127.0.0.1:{server.port}/ws/market upstream connected\n")
        sys.stdout.flush()


def main() -> None:
    kind, replay_ws, streams_file = sys.argv[1:4]
    if kind not in ("naive", "raw"):
        raise SystemExit(f"unknown relay {kind!r}")
    streams = json.loads(Path(streams_file).read_text())
    trio.run(_main, kind, replay_ws, streams)


if __name__ == "__main__":
    main()
