"""The rigs' WebSocket client (``rig.connect``, the package's ``open_websocket_client``, also used
by ``tests/recording_subscriber.py``, the role tests' and the e2e scripts' subscriber) against
python-trio/trio-websocket#184: a ping the server sends while the client's close frame is on its
way is answered by trio-websocket's reader in the client's closing state, and the reader fails
with wsproto's ``LocalProtocolError``. The daemon's read-proof pings make that race real for any
client that closes first. A raw wsproto server on 127.0.0.1 makes it certain: it answers the
client's close frame with a ping first, then its own close frame.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Final

import pytest
import trio
import trio_websocket
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, CloseConnection, Request, TextMessage
from wsproto.utilities import LocalProtocolError

from tests.reliability.rig import connect

# a safety net against a hung test, not a wait for anything
CASE_TIMEOUT_S: Final = 10.0
# a server's ping frame (RFC 6455 §5.2: FIN + opcode 9, unmasked, 5 bytes of payload)
PING_FRAME: Final = b"\x89\x05proof"
# how trio-websocket's own client ends the race: the stray Cancelled of its interrupted close
# (trio-websocket 0.12), or the reader's error itself
RACE_ENDINGS: Final = (trio.Cancelled, LocalProtocolError, BaseExceptionGroup)


async def _ping_on_close(stream: trio.SocketStream) -> None:
    """Accept, send one message, and answer the client's close with a ping, then the close."""
    ws = WSConnection(ConnectionType.SERVER)
    while not any(isinstance(e, Request) for e in ws.events()):
        ws.receive_data(await stream.receive_some(4096))
    await stream.send_all(ws.send(AcceptConnection()) + ws.send(TextMessage(data="hello")))
    while data := await stream.receive_some(4096):
        ws.receive_data(data)
        for event in ws.events():
            if isinstance(event, CloseConnection):
                # wsproto sends nothing after a close it received: the frame by hand
                await stream.send_all(PING_FRAME + ws.send(event.response()))
                return


@pytest.fixture
async def url() -> AsyncIterator[str]:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, _ping_on_close, 0, host="127.0.0.1")
        )
        port = listeners[0].socket.getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws/market"
        nursery.cancel_scope.cancel()


def _mentions(exc: BaseException | None, kind: type[BaseException]) -> bool:
    """``kind`` is ``exc``, or in its groups, causes or contexts."""
    if exc is None:
        return False
    if isinstance(exc, kind):
        return True
    inner = list(exc.exceptions) if isinstance(exc, BaseExceptionGroup) else []
    return any(_mentions(e, kind) for e in [*inner, exc.__cause__, exc.__context__])


async def test_trio_websocket_alone_fails_when_a_ping_races_its_close(url: str) -> None:
    """The race is real: trio-websocket's own client ends in an error (a stray ``Cancelled``
    from its interrupted close, over the reader's ``LocalProtocolError``) instead of a clean
    close. If this starts failing, trio-websocket fixed #184."""
    with trio.fail_after(CASE_TIMEOUT_S), pytest.raises(RACE_ENDINGS) as raised:
        async with trio_websocket.open_websocket_url(url) as ws:
            assert await ws.get_message() == "hello"
    assert _mentions(raised.value, LocalProtocolError), raised.value


async def test_the_rig_client_closes_cleanly_when_a_ping_races_its_close(url: str) -> None:
    with trio.fail_after(CASE_TIMEOUT_S):
        async with connect(url) as ws:
            assert await ws.get_message() == "hello"
        assert ws.closed is not None and ws.closed.code == 1000
