"""A SocketStream for trio-websocket whose writes never tear a frame, with a non-blocking write.

trio-websocket writes each frame with one ``send_all``; the Hub's send deadline cancels that
call. On a plain SocketStream a cancelled ``send_all`` may leave half a frame on the wire,
after which no close frame can be read. :class:`FrameSafeStream` keeps the unsent rest of a
started frame and sends it first with the next write, so the 4008 close frame that follows a
timed-out send is still well-formed for a client that reads again in time.

Once the WebSocket is open (:meth:`FrameSafeStream.watch_pings`) it counts the client's pings
(``tradecanvas.serve.client_frames``) and closes the connection (1008) of one over the limit.

It also serializes its writers (trio-websocket's own writes — pongs, the close frame — and
the Hub's pre-framed ones, ``tradecanvas.serve.ws_server``), and offers
:meth:`FrameSafeStream.send_all_nowait`: the Hub's publishing writes a frame straight to an
idle subscriber's socket without waking its task (``tradecanvas.serve.hub``).

:attr:`FrameSafeStream.request_abandoned` is set when the client's input ends (or the
connection breaks) before the end of its HTTP request's head: the WS port ends that
handshake then, which trio-websocket does not (a client that half-closes after a whole
request still gets its answer).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import final

import trio

from tradecanvas.serve.client_frames import (
    FLOOD_CLOSE_S,
    ClientFault,
    ClientFrames,
    close_frame,
    log_client_fault,
    ping_limit,
)
from tradecanvas.serve.in_flight import InFlight

log = logging.getLogger(__name__)


@final
class FrameSafeStream(trio.abc.HalfCloseableStream):
    """A SocketStream whose cancelled ``send_all`` never leaves half a frame behind.

    If a ``send_all`` is cancelled after part of its bytes went out, the rest is kept and
    sent before the next write's bytes; bytes of a write that never started are dropped
    (that frame was never begun). Writers take turns (a FIFO lock), so two tasks' frames
    never interleave. Everything else is the wrapped SocketStream's. Raises
    ``trio.BrokenResourceError`` / ``trio.ClosedResourceError`` like a SocketStream.
    """

    __slots__ = (
        "_frames",
        "_head_tail",
        "_lock",
        "_peer",
        "_unsent",
        "in_flight",
        "inner",
        "request_abandoned",
    )

    def __init__(self, inner: trio.SocketStream, in_flight: InFlight | None = None) -> None:
        self.inner = inner
        self.in_flight = in_flight
        self._unsent = b""
        self._lock = trio.StrictFIFOLock()
        self._frames: ClientFrames | None = None
        self._peer = "?"
        self.request_abandoned = trio.Event()
        # the last bytes read while the request's head is not complete (None: it is)
        self._head_tail: bytes | None = b""

    def watch_pings(self, peer: str) -> None:
        """Read the client's frames from here on (call it before the 101 is sent): a ping
        over the limit (1008) or a frame that breaks the protocol (1002, 1007) gets a close
        frame, if the client takes it within ``FLOOD_CLOSE_S``, and the read fails
        (``trio.BrokenResourceError``: trio-websocket aborts the connection)."""
        self._frames = ClientFrames(on_ping=ping_limit(trio.current_time))
        self._peer = peer

    @property
    def needs_flush(self) -> bool:
        """A write left bytes unsent: :meth:`flush` (or the next ``send_all``) sends them."""
        return bool(self._unsent)

    def send_all_nowait(self, data: bytes) -> bool:
        """Write ``data`` now, without blocking: True when the kernel took all of it.

        Raises ``trio.WouldBlock`` (nothing written) while another write is in progress or
        bytes of an earlier one wait, or when the socket takes nothing now. When it takes
        part, the rest is kept — the frames are committed, in order — and False is
        returned: the caller must :meth:`flush` before counting them as sent. Raises
        ``trio.ClosedResourceError`` / ``trio.BrokenResourceError`` like ``send_all``.
        """
        if self._unsent or self._lock.locked():
            raise trio.WouldBlock
        socket = self.inner.socket
        if socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        fd = socket.fileno()
        if fd == -1:
            raise trio.ClosedResourceError("this socket was already closed")
        try:
            # write(2) on a connected socket is send(2) without flags; trio made it
            # non-blocking, and Python ignores SIGPIPE
            sent = os.write(fd, data)
        except BlockingIOError:
            raise trio.WouldBlock from None
        except OSError as exc:
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        if self.in_flight is not None:
            self.in_flight.note_written(sent)
        if sent == len(data):
            return True
        self._unsent = data[sent:]
        return False

    async def flush(self) -> None:
        """Send what an earlier write left unsent (a checkpoint when nothing is)."""
        await self.send_all(b"")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        async with self._lock:
            await self._send_all(data)

    async def _send_all(self, data: bytes | bytearray | memoryview) -> None:
        if self.inner.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError("can't send data after sending EOF")
        started = len(self._unsent)  # bytes of a frame already begun
        payload = self._unsent + bytes(data) if self._unsent else bytes(data)
        self._unsent = b""
        if not payload:
            await self.inner.send_all(b"")
            return
        sent = 0
        try:
            while sent < len(payload):
                n = await self.inner.socket.send(memoryview(payload)[sent:])
                sent += n
                if self.in_flight is not None:
                    self.in_flight.note_written(n)
        except OSError as exc:
            if self.inner.socket.fileno() == -1:
                raise trio.ClosedResourceError("this socket was already closed") from None
            raise trio.BrokenResourceError(f"socket connection broken: {exc}") from exc
        finally:
            if sent < len(payload):
                # keep the begun frames' rest; this write's own bytes only once it began
                self._unsent = payload[sent:] if sent > started else payload[sent:started]

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self.inner.send_eof()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        try:
            data = await self.inner.receive_some(max_bytes)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            self._input_ended()
            raise
        if not data:
            self._input_ended()
        elif self._head_tail is not None:
            seen = self._head_tail + data
            self._head_tail = None if b"\r\n\r\n" in seen else seen[-3:]
        if self._frames is not None:
            try:
                self._frames.feed(data)
            except ClientFault as fault:
                # the close frame after any write in progress, if the client takes it soon;
                # else the connection ends without it
                with (
                    trio.move_on_after(FLOOD_CLOSE_S),
                    contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
                ):
                    await self.send_all(close_frame(fault.code, str(fault)))
                log_client_fault(self._peer, fault)
                raise trio.BrokenResourceError(str(fault)) from fault
        return data

    def _input_ended(self) -> None:
        if self._head_tail is not None:
            self.request_abandoned.set()

    async def aclose(self) -> None:
        await self.inner.aclose()


__all__ = ["FrameSafeStream"]
