"""A SocketStream for trio-websocket whose cancelled writes never tear a frame.

trio-websocket writes each frame with one ``send_all``; the Hub's send timeout cancels that
call. On a plain SocketStream a cancelled ``send_all`` may leave half a frame on the wire,
after which no close frame can be read. :class:`FrameSafeStream` keeps the unsent rest of a
started frame and sends it first with the next write, so the 4008 close frame that follows a
timed-out send is still well-formed for a client that reads again in time.
"""

from __future__ import annotations

from typing import final

import trio


@final
class FrameSafeStream(trio.abc.HalfCloseableStream):
    """A SocketStream whose cancelled ``send_all`` never leaves half a frame behind.

    If a ``send_all`` is cancelled after part of its bytes went out, the rest is kept and
    sent before the next write's bytes; bytes of a write that never started are dropped
    (that frame was never begun). Everything else is the wrapped SocketStream's. Raises
    ``trio.BrokenResourceError`` / ``trio.ClosedResourceError`` like a SocketStream.
    """

    def __init__(self, inner: trio.SocketStream) -> None:
        self.inner = inner
        self._unsent = b""

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.inner.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        payload = self._unsent + bytes(data) if self._unsent else bytes(data)
        self._unsent = b""
        if not payload:
            await self.inner.send_all(b"")
            return
        sent = 0
        try:
            while sent < len(payload):
                sent += await self.inner.socket.send(memoryview(payload)[sent:])
        except OSError as exc:
            if self.inner.socket.fileno() == -1:
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        finally:
            if 0 < sent < len(payload):
                self._unsent = payload[sent:]

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


__all__ = ["FrameSafeStream"]
