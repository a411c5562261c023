"""A TCP proxy in front of PostgreSQL that a test cuts and restores: the shared server is
never restarted (other runs use it), yet every connection through the proxy sees the server
go away — established ones are closed (so their backends abort and let go of their locks),
new ones are closed at once — until :meth:`TcpProxy.restore`."""

from __future__ import annotations

from typing import Final, final

import trio
from psycopg.conninfo import conninfo_to_dict

CHUNK: Final = 65_536


class PgProxy:
    """A proxy on 127.0.0.1 (a port of its own, once :meth:`run` started) in front of the
    server of ``pg_url``; :meth:`_handle` serves each connection."""

    def __init__(self, pg_url: str) -> None:
        parts = conninfo_to_dict(pg_url)
        self.pg_url = pg_url
        self.target_host = str(parts.get("host", "127.0.0.1"))
        self.target_port = int(str(parts.get("port", 5432)))
        self.port = 0

    @property
    def url(self) -> str:
        """The database's URL, through the proxy."""
        parts = conninfo_to_dict(self.pg_url)
        user = f"{parts['user']}@" if parts.get("user") else ""
        return f"postgresql://{user}127.0.0.1:{self.port}/{parts.get('dbname', '')}"

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            task_status.started()
            await trio.serve_listeners(self._handle, listeners, handler_nursery=nursery)

    async def _handle(self, client: trio.SocketStream) -> None:
        raise NotImplementedError


@final
class TcpProxy(PgProxy):
    def __init__(self, pg_url: str) -> None:
        super().__init__(pg_url)
        self.up = True
        self._scopes: set[trio.CancelScope] = set()

    def cut(self) -> None:
        self.up = False
        for scope in list(self._scopes):
            scope.cancel()

    def restore(self) -> None:
        self.up = True

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            if not self.up:
                return
            try:
                server = await trio.open_tcp_stream(self.target_host, self.target_port)
            except OSError:
                return
            async with server:
                with trio.CancelScope() as scope:
                    self._scopes.add(scope)
                    try:
                        async with trio.open_nursery() as nursery:
                            nursery.start_soon(self._pump, client, server, scope)
                            nursery.start_soon(self._pump, server, client, scope)
                    finally:
                        self._scopes.discard(scope)

    @staticmethod
    async def _pump(
        src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope
    ) -> None:
        try:
            while data := await src.receive_some(CHUNK):
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        scope.cancel()  # one side ended: end both
