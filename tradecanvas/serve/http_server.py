"""Serving ASGI apps with Hypercorn's trio worker: the one place its configuration lives
(the daemon's HTTP API and ``tradecanvas replay`` both use it).

:func:`serve_http` binds the socket itself (``port=0`` gives a known port and a failed bind
raises OSError before anything starts), hands it to Hypercorn and drains on cancellation.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Final, cast

import hypercorn.config
import hypercorn.trio
import trio
from hypercorn.typing import ASGIFramework
from starlette.types import ASGIApp

log = logging.getLogger(__name__)

# Graceful drain of in-flight requests on shutdown. The daemon must exit within 10 s of
# SIGTERM (the unit's TimeoutStopSec is above that) and other services drain alongside.
HTTP_DRAIN_S: Final = 5.0
# Hypercorn drains for HTTP_DRAIN_S itself; this is the hard stop on top of it (lifespan
# shutdown, closing sockets) before its whole scope is cancelled.
_HARD_STOP_GRACE_S: Final = 1.0


def _bind_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (not yet listening). Raises OSError; a socket
    whose bind fails is closed (Hypercorn's own binding leaks it)."""
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    if not infos:
        raise OSError(f"cannot resolve HTTP host {host!r}")
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def hypercorn_config(binds: list[str], drain_s: float) -> hypercorn.config.Config:
    """Hypercorn for our servers: the given binds, a bounded graceful drain, our logging."""
    config = hypercorn.config.Config()
    config.bind = list(binds)
    config.graceful_timeout = drain_s
    # our own logging setup formats Hypercorn's messages; no access log (journald volume)
    config.errorlog = logging.getLogger("hypercorn.error")
    config.accesslog = None
    config.include_server_header = False
    return config


async def serve_http(
    app: ASGIApp,
    *,
    host: str,
    port: int,
    drain_s: float = HTTP_DRAIN_S,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` with Hypercorn's trio worker until cancelled; then drain.

    We bind the socket ourselves (so ``port=0`` gives a known port and a failed bind
    raises OSError here, before anything starts) and hand its descriptor to Hypercorn as
    ``fd://N``; Hypercorn owns it from then on, listens on it and closes it when it stops
    accepting. ``task_status.started(port)`` is called once Hypercorn reports the socket
    listening.

    On cancellation Hypercorn's ``shutdown_trigger`` fires: it closes the listener (new
    connections are refused), closes idle keep-alive connections and lets in-flight
    requests finish for up to ``drain_s`` seconds; the whole server is cancelled
    ``_HARD_STOP_GRACE_S`` after that at the latest. The server runs in a shielded scope
    so that the caller's cancellation becomes this bounded drain instead of an instant
    cancel.
    """
    sock = await bind_socket(host, port)
    bound = sock.getsockname()[1]
    config = hypercorn_config([f"fd://{sock.detach()}"], drain_s)
    shutdown = trio.Event()
    server_scope = trio.CancelScope(shield=True)

    async def run_server(task_status: trio.TaskStatus[list[str]]) -> None:
        with server_scope:
            await serve_asgi(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        try:
            await nursery.start(run_server)
            log.info("HTTP API listening on http://%s", _bind_text(host, bound))
            task_status.started(bound)
            await trio.sleep_forever()
        finally:
            shutdown.set()
            hard_stop = trio.current_time() + drain_s + _HARD_STOP_GRACE_S
            server_scope.deadline = min(server_scope.deadline, hard_stop)


async def serve_asgi(
    app: ASGIApp,
    config: hypercorn.config.Config,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """``hypercorn.trio.serve`` for a Starlette app; ``started(binds)`` once listening."""
    await hypercorn.trio.serve(
        # Starlette's and Hypercorn's ASGI type aliases are spelt differently
        cast("ASGIFramework", app),
        config,
        shutdown_trigger=shutdown_trigger,
        task_status=task_status,
    )
