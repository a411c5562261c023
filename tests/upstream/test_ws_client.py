"""open_websocket_client(queue_at_once=True): trio-websocket's reader queues a whole socket
read before it yields (real sockets on 127.0.0.1)."""

from __future__ import annotations

import functools

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Ping, Request, TextMessage

from tradecanvas.upstream.ws_client import get_message_nowait, open_websocket_client
from tradecanvas.upstream.ws_frames import FastTextFrames

MESSAGES = 50
ALL = [f"message {i}" for i in range(MESSAGES)]


async def _read_burst(
    queue_at_once: bool,
    queue_size: int = 1024,
    *,
    fast_frames: bool = False,
    with_answer: bool = False,
) -> tuple[list[str | bytes], int]:
    """Every message of a burst the server writes in one ``send_all`` (one socket read on
    loopback) while the client waits in ``get_message``, and how many the client had after
    that one wake-up, without a further checkpoint. ``with_answer``: the burst comes in the
    same ``send_all`` as the server's handshake answer, a ping in its middle."""
    go = trio.Event()

    async def server(stream: trio.SocketStream) -> None:
        ws = WSConnection(ConnectionType.SERVER)
        while not any(isinstance(e, Request) for e in ws.events()):
            ws.receive_data(await stream.receive_some(4096))
        answer = ws.send(AcceptConnection())
        if not with_answer:
            await stream.send_all(answer)
            answer = b""
            await go.wait()
        burst = [ws.send(TextMessage(data=m)) for m in ALL]
        if with_answer:
            burst.insert(MESSAGES // 2, ws.send(Ping(b"are you there")))
        await stream.send_all(answer + b"".join(burst))
        while data := await stream.receive_some(4096):  # the pong; answer the client's close
            ws.receive_data(data)
            for event in ws.events():
                if isinstance(event, CloseConnection):
                    await stream.send_all(ws.send(event.response()))
                    return

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, server, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        async with open_websocket_client(
            f"ws://127.0.0.1:{port}",
            message_queue_size=queue_size,
            receive_buffer_size=64 << 10,
            queue_at_once=queue_at_once,
            fast_frames=fast_frames,
        ) as ws:
            assert isinstance(ws._wsproto, FastTextFrames) == fast_frames
            go.set()
            got = [await ws.get_message()]
            while True:
                try:
                    got.append(get_message_nowait(ws))
                except trio.WouldBlock:
                    break
            at_once = len(got)
            while len(got) < MESSAGES:
                got.append(await ws.get_message())
        nursery.cancel_scope.cancel()
    return got, at_once


async def test_a_whole_read_is_queued_before_the_reader_yields() -> None:
    got, at_once = await _read_burst(queue_at_once=True)
    assert got == ALL
    assert at_once == MESSAGES


async def test_without_it_the_reader_yields_after_each_message() -> None:
    got, at_once = await _read_burst(queue_at_once=False)
    assert got == ALL
    assert at_once < MESSAGES


async def test_a_full_queue_still_waits_for_room() -> None:
    """Backpressure is unchanged: with room for 4 the reader waits, and nothing is lost."""
    got, at_once = await _read_burst(queue_at_once=True, queue_size=4)
    assert got == ALL
    assert at_once < MESSAGES


async def test_fast_frames_get_every_message_sent_with_the_handshake_answer() -> None:
    """The handshake answer, the messages and a ping in one write (one read on loopback):
    wsproto is given the HTTP answer, the frames after it are parsed by the fast path, the
    ping by wsproto; every message arrives, in order, at once."""
    got, at_once = await _read_burst(True, fast_frames=True, with_answer=True)
    assert got == ALL
    assert at_once > 1


async def test_fast_frames_with_a_full_queue_wait_for_room() -> None:
    """The fast frames' texts go straight into the queue; with room for 4 the rest are
    refused, handed to the reader as events and awaited: all arrive, in order."""
    got, at_once = await _read_burst(True, queue_size=4, fast_frames=True, with_answer=True)
    assert got == ALL
    assert at_once < MESSAGES
