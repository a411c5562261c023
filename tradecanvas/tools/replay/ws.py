"""The replay's WebSocket streams on their own listener: trio and wsproto, frames framed once
and written in batches.

Why not Starlette and Hypercorn, which serve the replay's REST: they frame and write every
message on its own, one ``send`` syscall each, which capped ``--speed max`` at about 2,000
frames a second. Here the timeline frames each message once (:func:`ws_text_frame`; a server's
frames are not masked, so the same bytes go to every client), and each client's writer sends
everything queued for it in one write.

Per connection (:func:`serve_replay_ws` → one handler)::

    handshake (wsproto)        the path gives the streams (:func:`route`); 404 for others
    ├─ writer                  its channel → batches → the socket; ``None``: close (1001)
    └─ reader                  SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS answers, pings,
                               the client's close; answers are written at once

Channel contract: a :class:`WsClient`'s channel is bounded (:data:`CLIENT_BUFFER`), filled by
the timeline (which waits for the slowest client) and drained only by its writer. Writes to a
socket take the connection's lock, so a frame never interleaves with an answer.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable
from typing import Final
from urllib.parse import parse_qs, urlsplit

import attrs
import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

from tradecanvas.tools.replay.core import answer_request

# frames queued per client; at --speed max the timeline waits for the slowest client
CLIENT_BUFFER: Final = 256
# frames a writer sends in one write (at most; ~100 KiB of kline frames)
WRITE_BATCH: Final = 256
DROP_CLOSE_CODE: Final = 1001
HANDSHAKE_S: Final = 10.0
READ_BYTES: Final = 64 << 10
# a client that went away, or broke the protocol: its connection ends, quietly
_ENDS: Final = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    LocalProtocolError,
    RemoteProtocolError,
)


def ws_text_frame(text: str) -> bytes:
    """One unmasked, final WebSocket text frame (RFC 6455 §5.2), as a server sends it."""
    payload = text.encode()
    size = len(payload)
    if size < 126:
        header = bytes((0x81, size))
    elif size < 1 << 16:
        header = bytes((0x81, 126)) + size.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + size.to_bytes(8, "big")
    return header + payload


def route(target: str) -> tuple[set[str], bool] | None:
    """A request target's streams and whether it is a raw stream: combined
    ``/stream?streams=a/b`` (or ``/market/stream``), raw ``/ws/<stream>`` or ``/ws`` (or
    under ``/market``); None for any other path."""
    parts = urlsplit(target)
    path = parts.path.removeprefix("/market")
    if path.startswith("/ws/") and len(path) > 4:
        return {path.removeprefix("/ws/")}, True
    if path == "/ws":
        return set(), True
    if path == "/stream":
        query = parse_qs(parts.query).get("streams", [""])[0]
        return {s for s in query.split("/") if s}, False
    return None


@attrs.define(eq=False)
class WsClient:
    """A connected client: its streams (changed by SUBSCRIBE), raw or combined frames, and
    its channel of framed bytes (``None``: close with :data:`DROP_CLOSE_CODE` after the
    frames queued before it)."""

    streams: set[str]
    raw: bool
    send: trio.MemorySendChannel[bytes | None]
    receive: trio.MemoryReceiveChannel[bytes | None]


def open_client(streams: set[str], raw: bool) -> WsClient:
    send, receive = trio.open_memory_channel[bytes | None](CLIENT_BUFFER)
    return WsClient(streams, raw, send, receive)


async def serve_replay_ws(
    host: str,
    port: int,
    attach: Callable[[set[str], bool], WsClient],
    detach: Callable[[WsClient], None],
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the streams on ``host:port`` until cancelled; ``started(port)`` once listening.
    ``attach`` registers a client once its handshake is done, ``detach`` when it is gone.
    Raises OSError when the port cannot be bound."""
    handler = functools.partial(_handle, attach=attach, detach=detach)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, listeners)
        task_status.started(bound)


async def _handle(
    stream: trio.SocketStream,
    *,
    attach: Callable[[set[str], bool], WsClient],
    detach: Callable[[WsClient], None],
) -> None:
    async with stream:
        ws = WSConnection(ConnectionType.SERVER)
        try:
            with trio.move_on_after(HANDSHAKE_S):
                request = await _read_request(stream, ws)
            if request is None:
                return
            routed = route(request.target)
            if routed is None:
                await stream.send_all(ws.send(RejectConnection(status_code=404)))
                return
            await stream.send_all(ws.send(AcceptConnection()))
        except _ENDS:
            return
        client = attach(*routed)
        lock = trio.Lock()
        try:
            async with trio.open_nursery() as nursery:
                for half in (_write_batches, _answer_requests):
                    nursery.start_soon(
                        _one_way, half, stream, ws, client, lock, nursery.cancel_scope
                    )
        finally:
            detach(client)
            client.send.close()


async def _read_request(stream: trio.SocketStream, ws: WSConnection) -> Request | None:
    while True:
        data = await stream.receive_some(READ_BYTES)
        if not data:
            return None
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, Request):
                return event


async def _one_way(
    half: Callable[[trio.SocketStream, WSConnection, WsClient, trio.Lock], Awaitable[None]],
    stream: trio.SocketStream,
    ws: WSConnection,
    client: WsClient,
    lock: trio.Lock,
    scope: trio.CancelScope,
) -> None:
    """Run one direction of the connection; when it ends (either way), end the other."""
    with contextlib.suppress(*_ENDS):
        await half(stream, ws, client, lock)
    scope.cancel()


async def _write_batches(
    stream: trio.SocketStream, ws: WSConnection, client: WsClient, lock: trio.Lock
) -> None:
    receive = client.receive
    async for first in receive:
        batch = [first]
        while len(batch) < WRITE_BATCH and batch[-1] is not None:
            try:
                batch.append(receive.receive_nowait())
            except (trio.WouldBlock, trio.EndOfChannel):
                break
        data = [item for item in batch if item is not None]
        async with lock:
            if data:
                await stream.send_all(b"".join(data))
            if batch[-1] is None:
                reason = "replay: connection dropped"
                await stream.send_all(ws.send(CloseConnection(DROP_CLOSE_CODE, reason)))
                return


async def _answer_requests(
    stream: trio.SocketStream, ws: WSConnection, client: WsClient, lock: trio.Lock
) -> None:
    parts: list[str] = []
    while True:
        data = await stream.receive_some(READ_BYTES)
        ws.receive_data(data or None)
        for event in ws.events():
            reply: bytes | None = None
            if isinstance(event, TextMessage):
                parts.append(event.data)
                if event.message_finished:
                    answer = answer_request("".join(parts), client.streams)
                    parts = []
                    reply = ws.send(TextMessage(answer))
            elif isinstance(event, Ping):
                reply = ws.send(event.response())
            elif isinstance(event, CloseConnection):
                async with lock:
                    await stream.send_all(ws.send(event.response()))
                return
            if reply is not None:
                async with lock:
                    await stream.send_all(reply)
        if not data:
            return
