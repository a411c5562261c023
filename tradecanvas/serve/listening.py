"""Binding the daemon's listening sockets: the HTTP port's (bound here, then served by
:mod:`tradecanvas.serve.http_server`), and a check at start-up that every port the role
listens on can be bound before anything is written."""

from __future__ import annotations

import socket

import trio

from tradecanvas.errors import ListenError
from tradecanvas.runtime_flags import RuntimeFlags


def bind_text(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def http_url_of(host: str, port: int) -> str | None:
    """The HTTP port's URL as a client on this machine writes it; None when the host is a
    wildcard (which address the client reaches it by is not known) or the port is any."""
    if not port or host in ("0.0.0.0", "::", ""):
        return None
    return f"http://{bind_text(host, port)}/"


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


async def check_listenable(flags: RuntimeFlags) -> None:
    """Bind and let go of each port ``flags.role`` listens on (HTTP; /ws/market's but on an
    ingest node), so that a port in use or a host not this machine's is one ListenError
    before the store is opened or written (``series.added``). Port 0 (any free) always
    binds. The listeners bind again for good later, and say the same if one was taken since."""
    targets = [("HTTP", flags.http_host, flags.http_port)]
    if flags.role != "ingest":
        targets.append(("WebSocket clients", flags.ws_host, flags.ws_port))
    for what, host, port in targets:
        if port:
            try:
                (await bind_socket(host, port)).close()
            except OSError as exc:
                raise ListenError.of(what, host, port, exc) from exc


__all__ = ["bind_socket", "bind_text", "check_listenable", "http_url_of"]
