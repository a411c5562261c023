"""A WebSocket client connection that always closes its socket (the Binance ingest loop,
``tradecanvas subscribe``, tests and benchmarks use it)."""

from __future__ import annotations

import contextlib
import ssl
from collections.abc import AsyncIterator
from typing import Final, final
from urllib.parse import urlsplit

import attrs
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.utilities import LocalProtocolError

from tradecanvas.errors import first_leaf
from tradecanvas.upstream.ws_frames import FastTextFrames

# trio-websocket's own default; Binance frames and /ws/market catch-up batches fit easily
MAX_MESSAGE_BYTES: Final = 1 << 20
# trio-websocket's defaults: messages its reader task queues for ours (when the queue is full
# it stops reading, and stops answering pings), and bytes per socket read
MESSAGE_QUEUE_SIZE: Final = 1
RECEIVE_BYTES: Final = 4 << 10


@attrs.frozen
class WsTarget:
    host: str
    port: int
    resource: str
    secure: bool


def parse_ws_url(url: str) -> WsTarget:
    """``ws://host[:port]/path[?query]`` (or ``wss://``). Raises ValueError saying why not."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"{url!r} is not a ws:// or wss:// URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    secure = parts.scheme == "wss"
    port = parts.port or (443 if secure else 80)  # .port raises ValueError for a bad one
    resource = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return WsTarget(parts.hostname, port, resource, secure)


@contextlib.asynccontextmanager
async def open_websocket_client(
    url: str,
    *,
    connect_timeout: float = 10.0,
    disconnect_timeout: float = 2.0,
    max_message_size: int = MAX_MESSAGE_BYTES,
    message_queue_size: int = MESSAGE_QUEUE_SIZE,
    receive_buffer_size: int = RECEIVE_BYTES,
    queue_at_once: bool = False,
    fast_frames: bool = False,
) -> AsyncIterator[trio_websocket.WebSocketConnection]:
    """``trio_websocket.open_websocket_url``, except that we own the TCP stream and always
    close it.

    trio-websocket 0.12 leaves a client's socket open when the server closes first: the
    client waits for the server's TCP close and then never closes its own end, leaking one
    descriptor per Binance-side disconnect. ``message_queue_size`` and
    ``receive_buffer_size`` are trio-websocket's (see :data:`MESSAGE_QUEUE_SIZE`);
    ``queue_at_once``: see :func:`queue_messages_at_once`; ``fast_frames``: wsproto with a
    fast path for small text frames (:class:`~tradecanvas.upstream.ws_frames.FastTextFrames`).
    Raises ValueError for a URL that is not ws(s)://, ``HandshakeError`` (``ConnectionTimeout``,
    ``ConnectionRejected``) when the connection cannot be opened.
    """
    target = parse_ws_url(url)
    host, port, tls = target.host, target.port, target.secure
    host_header = host if port in (80, 443) else f"{host}:{port}"
    stream: trio.SocketStream | trio.SSLStream[trio.SocketStream]
    try:
        with trio.fail_after(connect_timeout):
            if tls:
                stream = await trio.open_ssl_over_tcp_stream(
                    host, port, ssl_context=ssl.create_default_context(), https_compatible=True
                )
            else:
                stream = await trio.open_tcp_stream(host, port)
    except trio.TooSlowError:
        raise trio_websocket.ConnectionTimeout from None
    except OSError as exc:
        raise trio_websocket.HandshakeError(f"{host}:{port}: {exc}") from exc
    opened = False
    try:
        async with trio.open_nursery() as nursery:
            with trio.fail_after(connect_timeout):
                # trio_websocket.wrap_client_stream, with our WSConnection when asked
                ws = trio_websocket.WebSocketConnection(
                    stream,
                    FastTextFrames() if fast_frames else WSConnection(ConnectionType.CLIENT),
                    host=host_header,
                    path=target.resource,
                    max_message_size=max_message_size,
                    message_queue_size=message_queue_size,
                    receive_buffer_size=receive_buffer_size,
                )
                nursery.start_soon(ws._reader_task)
                await ws._open_handshake.wait()
            if queue_at_once:
                queue_messages_at_once(ws)
            opened = True
            graceful = True
            try:
                yield ws
            except BaseException as exc:
                # cancelled from outside, trio-websocket's reader task is being cancelled
                # too and could not read the server's close reply: just close the socket
                graceful = not _only_cancelled(exc)
                raise
            finally:
                if graceful:
                    with trio.CancelScope(
                        shield=True, deadline=trio.current_time() + disconnect_timeout
                    ):
                        await ws.aclose()
                nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        if opened and group.split(LocalProtocolError)[1] is None:
            # after our close frame, trio-websocket's reader answered a ping it read then and
            # failed (python-trio/trio-websocket#184): the close itself is done
            return
        # trio-websocket's reader task (a rejected handshake) or our handshake deadline
        failures, others = group.split(Exception)
        if opened or others is not None or failures is None:
            raise
        first = first_leaf(failures)
        if isinstance(first, trio.TooSlowError):
            raise trio_websocket.ConnectionTimeout from group
        if isinstance(first, trio_websocket.HandshakeError):
            raise first from group
        raise trio_websocket.HandshakeError(f"{host}:{port}: {first!r}") from group
    finally:
        await trio.aclose_forcefully(stream)


@final
class _QueueAtOnce:
    """The sending end of trio-websocket's message queue, as its reader task sees it once
    :func:`queue_messages_at_once` replaced it: ``send`` queues without a checkpoint while
    the queue has room, and waits (a checkpoint) only when it is full. :meth:`offer` is
    what the reader does with a whole text message of at most ``max_size`` characters,
    for :class:`~tradecanvas.upstream.ws_frames.FastTextFrames` to call directly."""

    def __init__(self, channel: trio.MemorySendChannel[str | bytes], max_size: int) -> None:
        self._channel = channel
        self._max_size = max_size

    async def send(self, message: str | bytes) -> None:
        try:
            self._channel.send_nowait(message)
        except trio.WouldBlock:
            await self._channel.send(message)

    def offer(self, text: str) -> bool:
        """Queue ``text``, a whole message, as the reader would from its event: False when
        the queue is full or the message too long (the reader must handle the event: wait
        for room, or close the connection); a closed queue drops it, as the reader does."""
        if len(text) > self._max_size:
            return False
        try:
            self._channel.send_nowait(text)
        except trio.WouldBlock:
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass  # the reader's own answer to a closed queue (0.12.2)
        return True

    async def aclose(self) -> None:
        await self._channel.aclose()


def queue_messages_at_once(ws: trio_websocket.WebSocketConnection) -> None:
    """Make ``ws``'s reader task queue every message of one socket read before it yields.

    trio-websocket's reader awaits the queue's ``send`` for each message it parses, a
    checkpoint each time: a read of N messages then costs N scheduler rounds, each waking
    our reader, then the consumer, for one message (and the ingest's committer, woken by
    the first close of a burst, commits it alone). Measured in issue 14's latency
    benchmark (5,000 closes/s) that was about a fifth of the daemon's CPU, and the groups
    of the group commit were 6 closes instead of ~30. The reader still yields at every
    socket read, and waits when the queue is full (backpressure unchanged). With
    :class:`~tradecanvas.upstream.ws_frames.FastTextFrames`, its fast frames' texts are
    queued by it directly (:meth:`~tradecanvas.upstream.ws_frames.FastTextFrames.deliver_to`).

    Reaches into trio-websocket's reader (its ``_send_channel``, which it looks up at each
    message, and ``_max_message_size``), as :func:`get_message_nowait` does its queue:
    0.12.2, pinned in setup.cfg. Call it right after the handshake, before the first
    message is read.
    """
    queue = _QueueAtOnce(ws._send_channel, ws._max_message_size)
    ws._send_channel = queue  # type: ignore[assignment]
    if isinstance(ws._wsproto, FastTextFrames):
        ws._wsproto.deliver_to(queue.offer)


def _only_cancelled(exc: BaseException) -> bool:
    if isinstance(exc, BaseExceptionGroup):
        return all(_only_cancelled(e) for e in exc.exceptions)
    return isinstance(exc, trio.Cancelled)


def get_message_nowait(ws: trio_websocket.WebSocketConnection) -> str | bytes:
    """The next message trio-websocket's reader task has queued, without waiting (and not a
    checkpoint): raises ``trio.WouldBlock`` when none is queued, ``ConnectionClosed`` as
    ``get_message`` does. After one ``await get_message()``, a reader drains the rest of a
    burst with this in one go, instead of one scheduler round trip per message.

    trio-websocket has no public ``get_message_nowait``; this is ``get_message`` (0.12.2,
    pinned in setup.cfg) on the same queue with ``receive_nowait`` in place of ``receive``.
    """
    try:
        return ws._recv_channel.receive_nowait()
    except (trio.ClosedResourceError, trio.EndOfChannel):
        raise trio_websocket.ConnectionClosed(ws._close_reason) from None
