"""A TCP proxy in front of PostgreSQL that makes the next COMMIT through it lose its answer,
the way a connection that breaks during a COMMIT does: :meth:`CommitProxy.arm` with
``forward=False`` drops the COMMIT (the server never gets it and rolls the transaction back
when the proxy closes its side), with ``forward=True`` sends it and drops the answer (the
transaction commits; the client never hears so). Either way the client's connection is
closed while it waits for the COMMIT's answer. :meth:`CommitProxy.hold` keeps the COMMIT
back and the client's connection open (the server's side may end meanwhile: a crash) until
:meth:`CommitProxy.release`, then closes it. Everything else passes through.

Deterministic: the store's write transaction sends its COMMIT alone (psycopg fetches every
earlier answer first), so the chunk holding ``COMMIT`` is that message and its Sync; with
``forward=True`` the server's answers after it are read and dropped up to its ReadyForQuery
before the server's side is closed, so the server has finished the COMMIT by then.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Final, final

import attrs
import trio

from tests.store_pg.proxy import PgProxy
from tradecanvas.store.postgres import PostgresStore

CHUNK: Final = 65_536
_READY_FOR_QUERY: Final = b"Z\x00\x00\x00\x05"


@attrs.define
class _Link:
    muted: bool = False  # the server's answers are dropped from here on
    held: bool = False  # the client's side stays open whatever the server's does


@final
class CommitProxy(PgProxy):
    def __init__(self, pg_url: str) -> None:
        super().__init__(pg_url)
        self._armed: bool | None = None
        self._hold = False
        self.held = trio.Event()  # a COMMIT is held back (hold)
        self._released = trio.Event()
        self.cut = 0  # COMMITs whose answer was lost so far

    def arm(self, *, forward: bool) -> None:
        """The next COMMIT through the proxy loses its answer (module docstring)."""
        self._armed = forward

    def hold(self) -> None:
        """The next COMMIT is not sent, and its connection is kept open (``held`` is set)
        until :meth:`release`."""
        self._armed, self._hold = False, True

    def release(self) -> None:
        self._released.set()

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            server = await trio.open_tcp_stream(self.target_host, self.target_port)
            async with server:
                link = _Link()
                with trio.CancelScope() as scope:
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._upstream, client, server, link, scope)
                        nursery.start_soon(self._downstream, server, client, link, scope)

    async def _upstream(
        self,
        client: trio.SocketStream,
        server: trio.SocketStream,
        link: _Link,
        scope: trio.CancelScope,
    ) -> None:
        try:
            while data := await client.receive_some(CHUNK):
                if self._armed is not None and b"COMMIT" in data:
                    forward, self._armed = self._armed, None
                    self.cut += 1
                    if forward:
                        link.muted = True
                        await server.send_all(data)
                    elif self._hold:
                        link.held = True
                        self.held.set()
                        await self._released.wait()
                    await client.aclose()  # the client sees its connection end
                    if not forward:
                        scope.cancel()  # and the server too: it rolls back
                    return  # forward: _downstream closes once the COMMIT is answered
                await server.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()

    @staticmethod
    async def _downstream(
        server: trio.SocketStream,
        client: trio.SocketStream,
        link: _Link,
        scope: trio.CancelScope,
    ) -> None:
        dropped = b""
        try:
            while data := await server.receive_some(CHUNK):
                if link.muted:
                    dropped += data
                    if _READY_FOR_QUERY in dropped:
                        break  # the COMMIT is done on the server
                    continue
                await client.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        if not link.held:
            scope.cancel()


@contextlib.asynccontextmanager
async def proxied_store(url: str) -> AsyncIterator[tuple[CommitProxy, PostgresStore]]:
    """A :class:`CommitProxy` in front of the database ``url`` and a store opened through
    it; the store closed and the proxy stopped afterwards."""
    proxy = CommitProxy(url)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.run)
        store = await PostgresStore.open(proxy.url)
        try:
            yield proxy, store
        finally:
            await store.aclose()
            nursery.cancel_scope.cancel()
