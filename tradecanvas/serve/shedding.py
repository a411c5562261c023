"""Connections refused at accept, before they cost a task: a cap per port, and one budget
of client sockets for both ports that keeps file descriptors for the daemon's own work.

Every client connection is a file descriptor, and so is each of the daemon's own files and
connections: the store (its file, WAL and checkpoint connection, or PostgreSQL's pool),
Redis, Binance's WebSockets and REST. Under systemd a service's soft open-file limit is
1024 unless the unit says otherwise, so a thousand idle or hostile connections used to
leave the daemon unable to reconnect to Binance or open its store's files (``accept``
failing with EMFILE is the least of it). Now:

- :func:`raise_open_files_limit` lifts the soft ``RLIMIT_NOFILE`` to the hard limit at
  start-up (as Go's runtime does; the unit also sets ``LimitNOFILE``);
- :class:`ClientSockets` is the budget: that limit less :data:`RESERVED_DESCRIPTORS`, shared
  by both listening ports; a connection accepted beyond it is reset at once;
- each port's :class:`Gate` also caps its own connections that are not yet sessions: on the
  WS port those in their handshake (``ws_server.MAX_PENDING_HANDSHAKES``), on the HTTP port
  every connection but an admitted /ws/market session (:data:`MAX_HTTP_CONNECTIONS`: HTTP
  requests, keep-alive connections and upgrades in progress). Admitted sessions are
  capped by ``TRADE_CANVAS_MAX_CONNECTIONS`` (``ws_session``).

A shed connection is closed with a reset inside the accept loop (:class:`SheddingListener`:
no task, no buffer), counted on the port's metric and logged at most once per
:data:`SHED_LOG_INTERVAL_S`. Clients retry with their backoff.
"""

from __future__ import annotations

import contextlib
import logging
import resource
import socket
import struct
import sys
from collections.abc import Iterator
from typing import Final, final

import trio
from prometheus_client import Counter, Gauge

from tradecanvas.ops.logs import ThrottledCount
from tradecanvas.ops.metrics import Metrics

log = logging.getLogger(__name__)

# file descriptors kept for the daemon's own files and connections (the store's, Redis,
# Binance's WebSockets and REST, the listeners, the event loop): far more than it uses
RESERVED_DESCRIPTORS: Final = 256
# connections on the HTTP port that are not admitted /ws/market sessions, at most
MAX_HTTP_CONNECTIONS: Final = 1024
# connections shed at accept are logged at most once per this many seconds per port
SHED_LOG_INTERVAL_S: Final = 10.0
# SO_LINGER on, timeout 0: close() resets the connection (no FIN handshake, no TIME_WAIT)
_RESET_ON_CLOSE: Final = struct.pack("ii", 1, 0)


# the soft limit asked for where the hard one is unlimited (not on Linux, whose hard limit
# is at most fs.nr_open)
_UNLIMITED_HARD_SOFT: Final = 65536


def raise_open_files_limit() -> int:
    """Raise the soft open-file limit to the hard one; the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    wanted = _UNLIMITED_HARD_SOFT if hard == resource.RLIM_INFINITY else hard
    if soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    return soft


@final
class ClientSockets:
    """The client sockets open on both ports together, against ``limit`` (None: no limit)."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.count = 0

    @classmethod
    def within_open_files_limit(cls, planned: int) -> ClientSockets:
        """The budget of this process: its open-file limit (raised first) less
        :data:`RESERVED_DESCRIPTORS`; a warning when that is below ``planned``, the client
        sockets the daemon's settings allow for."""
        limit = raise_open_files_limit()
        budget = max(0, limit - RESERVED_DESCRIPTORS)
        if budget < planned:
            log.warning(
                "the open-file limit is %d: at most %d client connections fit beside the"
                " daemon's own %d, where the settings allow for %d; connections beyond it are"
                " reset at accept. Raise LimitNOFILE in the unit (ulimit -n), or lower"
                " TRADE_CANVAS_MAX_CONNECTIONS",
                limit,
                budget,
                RESERVED_DESCRIPTORS,
                planned,
            )
        else:
            log.info("open-file limit %d: room for %d client connections", limit, budget)
        return cls(budget)

    def has_room(self) -> bool:
        return self.limit is None or self.count < self.limit


@final
class Place:
    """One accepted connection's place at its :class:`Gate`: pending until :meth:`admitted`
    (the connection became a session; idempotent), given back by :meth:`close`."""

    __slots__ = ("_gate", "pending")

    def __init__(self, gate: Gate) -> None:
        self._gate = gate
        self.pending = True

    def admitted(self) -> None:
        if self.pending:
            self.pending = False
            self._gate.pending -= 1
            self._gate.show()

    def close(self) -> None:
        self.admitted()
        self._gate.sockets.count -= 1


@final
class Gate:
    """One port's accounting at accept: its connections not yet sessions (``pending``,
    capped at ``limit``) and its share of the :class:`ClientSockets`. The listener enters
    each connection it returns (:meth:`enter`); its handler holds the :class:`Place` that
    :meth:`place` gives, and closes it when the connection ends."""

    def __init__(
        self,
        port: str,
        limit: int,
        sockets: ClientSockets,
        *,
        pending_what: str,
        pending_gauge: Gauge | None = None,
        shed_total: Counter | None = None,
    ) -> None:
        self.port = port
        self.limit = limit
        self.pending_what = pending_what
        self.sockets = sockets
        self.pending = 0
        self._gauge = pending_gauge
        self._shed_total = shed_total
        self._shed_log = ThrottledCount(SHED_LOG_INTERVAL_S)

    def refusal(self) -> str | None:
        """Why a connection accepted now must be shed; None when it may stay."""
        if self.pending >= self.limit:
            return f"{self.limit} {self.pending_what}, the limit"
        if not self.sockets.has_room():
            return f"{self.sockets.limit} client sockets open, all the open-file limit leaves"
        return None

    @classmethod
    def unlimited(cls, port: str) -> Gate:
        """A gate that sheds nothing and reports nowhere (a server without caps)."""
        return cls(port, sys.maxsize, ClientSockets(None), pending_what="connections")

    def enter(self) -> None:
        self.pending += 1
        self.sockets.count += 1
        self.show()

    @contextlib.contextmanager
    def place(self) -> Iterator[Place]:
        """The place of a connection :meth:`enter` counted, given back on the way out."""
        held = Place(self)
        try:
            yield held
        finally:
            held.close()

    def show(self) -> None:
        if self._gauge is not None:
            self._gauge.set(self.pending)

    def shed(self, stream: trio.SocketStream, why: str) -> None:
        """Close ``stream`` at once, with a reset; count it, and log now and then."""
        with contextlib.suppress(OSError):
            stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET_ON_CLOSE)
        stream.socket.close()
        if self._shed_total is not None:
            self._shed_total.inc()
        if (shed := self._shed_log.add(trio.current_time())) is not None:
            log.warning("%s: %d connection(s) closed at accept: %s", self.port, shed, why)


def http_gate(sockets: ClientSockets, metrics: Metrics, limit: int = MAX_HTTP_CONNECTIONS) -> Gate:
    """The HTTP port's gate: ``limit`` connections that are not sessions, and its share of
    ``sockets``."""
    return Gate(
        "HTTP port",
        limit,
        sockets,
        pending_what="connections open",
        pending_gauge=metrics.http_connections,
        shed_total=metrics.http_connections_shed_total,
    )


def ws_gate(sockets: ClientSockets, metrics: Metrics, limit: int) -> Gate:
    """The WS port's gate: ``limit`` connections in their handshake, and its share of
    ``sockets``."""
    return Gate(
        "ws port",
        limit,
        sockets,
        pending_what="handshakes pending",
        pending_gauge=metrics.ws_handshakes_pending,
        shed_total=metrics.ws_handshakes_shed_total,
    )


@final
class SheddingListener(trio.abc.Listener[trio.SocketStream]):
    """A SocketListener whose ``accept`` returns only connections its :class:`Gate` takes:
    the others are closed inside it, before ``trio.serve_listeners`` would start a task for
    them. A connection returned has entered the gate (its handler must close it there)."""

    def __init__(self, inner: trio.SocketListener, gate: Gate) -> None:
        self._inner = inner
        self._gate = gate

    async def accept(self) -> trio.SocketStream:
        while True:
            stream = await self._inner.accept()  # a checkpoint each time: no starving
            why = self._gate.refusal()
            if why is None:
                self._gate.enter()
                return stream
            self._gate.shed(stream, why)

    async def aclose(self) -> None:
        await self._inner.aclose()


__all__ = [
    "MAX_HTTP_CONNECTIONS",
    "RESERVED_DESCRIPTORS",
    "SHED_LOG_INTERVAL_S",
    "ClientSockets",
    "Gate",
    "Place",
    "SheddingListener",
    "http_gate",
    "raise_open_files_limit",
    "ws_gate",
]
