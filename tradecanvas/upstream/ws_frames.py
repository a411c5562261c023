"""A WebSocket client's wsproto connection with a fast path for the frames it receives
most: final, unmasked text frames up to 64 KiB, parsed without wsproto's per-frame
machinery; every other frame goes to wsproto.

wsproto parses each frame through a chain of generators, a header object, a masker and an
incremental UTF-8 decoder, and deletes it from the front of its buffer (a copy of the rest
of a 64 KiB read per frame): about 11 µs a kline frame, a fifth of the daemon's CPU at
``replay --speed max`` (issue 14). :class:`FastTextFrames` frames the byte stream itself,
a few hundred ns a kline frame. trio-websocket uses it in place of its ``WSConnection``
(:func:`~tradecanvas.upstream.ws_client.open_websocket_client` with ``fast_frames``).

Exactness: wsproto sees every byte that is not a fast frame, in order, and only whole
frames' bytes follow one another into it — it is never given a frame's middle — so it
parses (and answers, or fails on) those frames as it would have. A frame is fast only when
wsproto's answer is certain: FIN, no RSV bit (wsproto fails one without an extension),
opcode text, not masked (a client fails a masked one), its length in the shortest form,
valid UTF-8, and no fragmented message in progress in wsproto: then wsproto would yield
``TextMessage(data, frame_finished=True, message_finished=True)``, and so does this. Before
the opening handshake is done, wsproto is given the bytes up to the end of the server's
HTTP response, and the frames after it in the same read stay here. Once wsproto reports a
close (the server's, or a frame it refused) it gets every byte after, as without this.
With :meth:`FastTextFrames.deliver_to`, a fast frame's text goes straight to the reader's
queue instead of being yielded as that event, in its place among the events.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import Final, final

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, CloseConnection, Event, TextMessage

_FIN_TEXT: Final = 0x81  # FIN, no RSV bit, opcode 1 (text)
_MASKED: Final = 0x80
_RECEIVING: Final = (ConnectionState.OPEN, ConnectionState.LOCAL_CLOSING)
_END_OF_HEAD: Final = b"\r\n\r\n"


@final
class FastTextFrames(WSConnection):
    """A client ``WSConnection`` whose ``receive_data``/``events`` take the fast frames
    themselves (see the module docstring).

    The received bytes not yet parsed are ``_buffer[_pos:]``: whole frames, then at most
    one incomplete frame. ``_to_frame_end`` bytes still to come belong to a frame wsproto
    has the beginning of; they go straight to it."""

    def __init__(self) -> None:
        super().__init__(ConnectionType.CLIENT)
        self._buffer = b""
        self._pos = 0
        self._to_frame_end = 0
        self._in_message = False  # wsproto yielded part of a message, not its end
        self._wsproto_only = False  # after a close: every byte to wsproto
        self._head_tail = b""  # the last bytes of the handshake response given so far
        # takes a fast frame's text in place of its TextMessage when it returns True (see
        # :meth:`deliver_to`); None: every message is an event
        self._deliver: Callable[[str], bool] | None = None

    def deliver_to(self, deliver: Callable[[str], bool] | None) -> None:
        """Hand each fast frame's text to ``deliver`` instead of yielding its
        ``TextMessage``; a text it refuses (False) is yielded as the event after all.

        For the reader that turns a whole message event into that text and queues it
        (:func:`~tradecanvas.upstream.ws_client.queue_messages_at_once`): a fast frame is a
        whole message, so ``deliver`` is what that reader would do with its event, without
        building the event, dispatching it and awaiting two coroutines per frame (about a
        tenth of the daemon's CPU at ``replay --speed max``). Events and delivered texts
        keep the order of their frames: a refused text is yielded before the next frame is
        parsed, and the caller handles the events in order."""
        self._deliver = deliver

    @property
    def delivering(self) -> Callable[[str], bool] | None:
        """What :meth:`deliver_to` installed (a caller may wrap it and install that)."""
        return self._deliver

    def receive_data(self, data: bytes | None) -> None:
        if data is None or self._wsproto_only:
            self._all_to_wsproto()
            super().receive_data(data)
            return
        if self.state is ConnectionState.CONNECTING:
            seen = self._head_tail + data
            end = seen.find(_END_OF_HEAD)
            if end < 0:
                self._head_tail = seen[-len(_END_OF_HEAD) + 1 :]
                super().receive_data(data)
                return
            cut = end + len(_END_OF_HEAD) - len(self._head_tail)
            super().receive_data(data[:cut])
            data = data[cut:]
            if self.state not in _RECEIVING:  # rejected: the body is HTTP's
                self._wsproto_only = True
                if data:
                    super().receive_data(data)
                return
        elif self.state not in _RECEIVING:
            self._wsproto_only = True
            self._all_to_wsproto()
            super().receive_data(data)
            return
        if self._to_frame_end:
            given = data[: self._to_frame_end]
            self._to_frame_end -= len(given)
            super().receive_data(given)
            data = data[len(given) :]
        if data:
            rest = self._buffer[self._pos :]
            self._buffer, self._pos = (rest + data if rest else data), 0

    def events(self) -> Generator[Event, None, None]:
        yield from self._wsproto_events()  # its bytes came before ours
        buffer = self._buffer
        end = len(buffer)
        deliver = self._deliver
        while not self._wsproto_only:
            pos = self._pos
            available = end - pos
            if available < 2:
                break
            first, second = buffer[pos], buffer[pos + 1]
            size = second & 0x7F
            head = 2 if size < 126 else 4 if size == 126 else 10
            if second & _MASKED:
                head += 4
            if available < head:
                break
            if size == 126:
                size = int.from_bytes(buffer[pos + 2 : pos + 4])
            elif size == 127:
                size = int.from_bytes(buffer[pos + 2 : pos + 10])
            frame_end = pos + head + size
            if (
                first == _FIN_TEXT
                and (head == 2 or (head == 4 and size >= 126))  # unmasked, shortest form
                and not self._in_message
            ):
                if frame_end > end:
                    break  # the rest comes with the next read
                try:
                    text = buffer[pos + head : frame_end].decode()
                except UnicodeDecodeError:
                    pass  # wsproto's to refuse
                else:
                    self._pos = frame_end
                    if deliver is None or not deliver(text):
                        yield TextMessage(data=text, frame_finished=True, message_finished=True)
                    continue
            # anything else is wsproto's, from its first byte: what has come of it so far
            self._pos = min(frame_end, end)
            self._to_frame_end = frame_end - self._pos
            super().receive_data(buffer[pos : self._pos])
            yield from self._wsproto_events()
        if self._pos >= end:
            self._buffer, self._pos = b"", 0

    def _wsproto_events(self) -> Generator[Event, None, None]:
        for event in super().events():
            if isinstance(event, CloseConnection):
                self._wsproto_only = True  # the rest, if any, as wsproto would see it
                self._all_to_wsproto()
            elif isinstance(event, (TextMessage, BytesMessage)):
                self._in_message = not event.message_finished
            yield event

    def _all_to_wsproto(self) -> None:
        """Hand the bytes not yet parsed to wsproto (as trio-websocket would have, which
        stops giving it any once it is closed)."""
        rest = self._buffer[self._pos :]
        self._buffer, self._pos = b"", 0
        if rest and self.state is not ConnectionState.CLOSED:
            super().receive_data(rest)
