"""A TCP proxy between the page and the daemon that can fail the way a phone's network does:
``blackhole()`` stops every open connection silently — no byte passes either way, and no
FIN or RST says so (a phone that changed networks, a NAT entry that expired) — while new
connections work; ``refuse()`` resets every open connection and refuses new ones (no
network at all) until ``refuse(False)``.

Plain threads (the browser tests are synchronous): one accepts, two a connection copy bytes,
and a blackholed copier waits on the proxy's end instead of writing."""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Final, final

import attrs

LINGER_RESET: Final = b"\x01\x00\x00\x00\x00\x00\x00\x00"  # SO_LINGER on, 0 s: close sends RST


@final
@attrs.define
class _Link:
    client: socket.socket
    upstream: socket.socket
    dead: bool = False

    def reset(self) -> None:
        for s in (self.client, self.upstream):
            # shutdown wakes the copier blocked in recv (a close from another thread would
            # not); both peers see the connection end
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@final
class TcpProxy:
    """127.0.0.1:``port`` forwarding to 127.0.0.1:``target``; ``origin`` is its http URL."""

    def __init__(self, target: int) -> None:
        self.target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.05)  # the accept loop looks at `_ended` this often
        self.port: int = self._listener.getsockname()[1]
        self.origin = f"http://127.0.0.1:{self.port}"
        self._links: list[_Link] = []  # the connections open (not reset)
        self._all: list[_Link] = []  # every connection, its sockets closed at the end
        self._lock = threading.Lock()
        self._refusing = False
        self._ended = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> TcpProxy:
        self._spawn(self._accept)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._ended.set()
        with self._lock:
            for link in self._all:
                link.reset()
        for thread in self._threads:
            thread.join(timeout=5)
        for link in self._all:
            link.client.close()
            link.upstream.close()
        self._listener.close()

    def blackhole(self) -> None:
        """Every connection open now stops passing bytes, without a word to either end."""
        with self._lock:
            for link in self._links:
                link.dead = True

    def refuse(self, refusing: bool = True) -> None:
        """No network: the open connections are reset and new ones refused (or admitted again)."""
        with self._lock:
            self._refusing = refusing
            if refusing:
                for link in self._links:
                    link.reset()
                self._links.clear()

    def _spawn(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while not self._ended.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            with self._lock:
                if self._refusing:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                    client.close()
                    continue
                try:
                    upstream = socket.create_connection(("127.0.0.1", self.target))
                except OSError:  # the daemon is down: so is this connection
                    client.close()
                    continue
                link = _Link(client, upstream)
                self._links.append(link)
                self._all.append(link)
            self._spawn(self._copy, link, link.client, link.upstream)
            self._spawn(self._copy, link, link.upstream, link.client)

    def _copy(self, link: _Link, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if link.dead:
                    self._ended.wait()  # swallowed: the connection is silent from now on
                    return
                sink.sendall(data)
        except OSError:
            return
        if not link.dead:
            link.reset()
