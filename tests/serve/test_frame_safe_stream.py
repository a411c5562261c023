"""FrameSafeStream over a socketpair: a cancelled write is finished first, never torn."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
import trio
import trio.testing

from tradecanvas.serve.frame_safe_stream import FrameSafeStream


def stream_pair() -> tuple[FrameSafeStream, trio.SocketStream]:
    """A FrameSafeStream writer and the plain reader at the other end of a socketpair."""
    left, right = trio.socket.socketpair()
    return FrameSafeStream(trio.SocketStream(left)), trio.SocketStream(right)


@contextlib.asynccontextmanager
async def reading(reader: trio.SocketStream) -> AsyncIterator[bytearray]:
    """Reads everything into the yielded buffer while the body writes, until the writer
    closes."""
    received = bytearray()

    async def read_all() -> None:
        while chunk := await reader.receive_some(1 << 16):
            received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(read_all)
        yield received


async def test_frame_safe_stream_finishes_a_cancelled_write_first() -> None:
    writer, reader = stream_pair()
    payload = bytes(range(256)) * 40_000  # ~10 MB: far more than the socket buffers hold
    with trio.move_on_after(0.05) as scope:
        await writer.send_all(payload)  # blocks: nobody reads yet
    assert scope.cancelled_caught
    async with reading(reader) as received:
        await writer.send_all(b"<next frame>")
        await writer.aclose()
    # the started write was completed before the next one: nothing lost, nothing torn
    assert bytes(received) == payload + b"<next frame>"
    await reader.aclose()


async def test_frame_safe_stream_drops_a_write_that_never_started() -> None:
    writer, reader = stream_pair()
    with trio.CancelScope() as scope:
        scope.cancel()
        await writer.send_all(b"never started")
    await writer.send_all(b"second")
    await writer.aclose()
    assert await reader.receive_some(100) == b"second"
    await reader.aclose()


async def test_send_all_nowait_writes_at_once_and_refuses_when_the_socket_is_full() -> None:
    writer, reader = stream_pair()
    assert writer.send_all_nowait(b"first") is True
    assert await reader.receive_some(100) == b"first"
    # fill the socket: the last write that took anything took only part of its bytes
    chunk = b"x" * 65536
    written = bytearray()
    while True:
        try:
            complete = writer.send_all_nowait(chunk)
        except trio.WouldBlock:
            break
        written += chunk
        if not complete:
            break
    assert writer.needs_flush
    with pytest.raises(trio.WouldBlock):  # the rest of a begun write waits: nothing else
        writer.send_all_nowait(b"overtaker")
    async with reading(reader) as received:
        await writer.flush()
        await writer.send_all(b"<next frame>")
        await writer.aclose()
    assert bytes(received) == bytes(written) + b"<next frame>"
    await reader.aclose()


async def test_send_all_nowait_waits_for_a_write_in_progress() -> None:
    writer, reader = stream_pair()
    payload = b"y" * 10_000_000  # blocks: nobody reads yet
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.send_all, payload)
        await trio.testing.wait_all_tasks_blocked()
        with pytest.raises(trio.WouldBlock):
            writer.send_all_nowait(b"would interleave")
        received = 0
        while received < len(payload):
            received += len(await reader.receive_some(1 << 16))
    assert writer.send_all_nowait(b"after") is True
    assert await reader.receive_some(100) == b"after"
    await writer.aclose()
    with pytest.raises(trio.ClosedResourceError):
        writer.send_all_nowait(b"closed")
    await reader.aclose()


async def test_a_write_cancelled_before_it_began_keeps_the_rest_of_an_earlier_one() -> None:
    writer, reader = stream_pair()
    frame = b"z" * 10_000_000
    with trio.move_on_after(0.05):
        await writer.send_all(frame)  # part of it went out
    assert writer.needs_flush
    with trio.CancelScope() as scope:
        scope.cancel()
        await writer.send_all(b"never started")  # cancelled at once
    async with reading(reader) as received:
        await writer.send_all(b"<next>")
        await writer.aclose()
    assert bytes(received) == frame + b"<next>"
    await reader.aclose()
