"""FrameSafeStream over a socketpair: a cancelled write is finished first, never torn."""

from __future__ import annotations

import trio

from tradecanvas.serve.frame_safe_stream import FrameSafeStream


async def test_frame_safe_stream_finishes_a_cancelled_write_first() -> None:
    left, right = trio.socket.socketpair()
    writer = FrameSafeStream(trio.SocketStream(left))
    reader = trio.SocketStream(right)
    payload = bytes(range(256)) * 40_000  # ~10 MB: far more than the socket buffers hold
    with trio.move_on_after(0.05) as scope:
        await writer.send_all(payload)  # blocks: nobody reads yet
    assert scope.cancelled_caught
    received = bytearray()

    async def read_all() -> None:
        while chunk := await reader.receive_some(1 << 16):
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        await writer.send_all(b"<next frame>")
        await writer.aclose()
    # the started write was completed before the next one: nothing lost, nothing torn
    assert bytes(received) == payload + b"<next frame>"
    await reader.aclose()


async def test_frame_safe_stream_drops_a_write_that_never_started() -> None:
    left, right = trio.socket.socketpair()
    writer = FrameSafeStream(trio.SocketStream(left))
    reader = trio.SocketStream(right)
    with trio.CancelScope() as scope:
        scope.cancel()
        await writer.send_all(b"never started")
    await writer.send_all(b"second")
    await writer.aclose()
    assert await reader.receive_some(100) == b"second"
    await reader.aclose()
