"""What the HTTP server tests share: ``serve_http`` on 127.0.0.1 that a test can stop (start
its drain) and watch finish."""

from __future__ import annotations

import attrs
import trio
from starlette.types import ASGIApp

from tradecanvas.serve.http_server import HTTP_DRAIN_S, serve_http


@attrs.define
class StoppableServer:
    """``serve_http(app)`` on a free port, in a cancel scope of its own: ``scope.cancel()``
    starts the drain, and ``done`` is set once ``serve_http`` returned."""

    app: ASGIApp
    drain_s: float = HTTP_DRAIN_S
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    done: trio.Event = attrs.Factory(trio.Event)

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Started with the port it listens on."""
        with self.scope:
            await serve_http(
                self.app, host="127.0.0.1", port=0, drain_s=self.drain_s, task_status=task_status
            )
        self.done.set()
