"""A real ``/ws/market`` client that records every message: the role tests' (tests/bus) and
the acceptance replay's (scripts/e2e_common.py) subscriber."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio
import trio_websocket

from tradecanvas.upstream.ws_client import open_websocket_client
from tradecanvas.wire.json import dumps, loads

OBJ = dict[str, Any]


class Subscriber:
    """A real /ws/market client recording every message until the server closes the
    connection, :meth:`leave`, or the caller cancels.

    :meth:`run` sends the ``subscribe`` messages, then a ping: the server handles a client's
    messages in order, so the pong means every subscription is in place, and only then does
    it report started, with the connection (with no ``subscribe`` messages: at once, and no
    ping). A close by the server is recorded (``closed_code``, ``lost``) and raised out of
    :meth:`run` unless ``expect_loss`` (a killed edge, a SIGTERM the caller checks).
    """

    def __init__(self, name: str = "", *, expect_loss: bool = False) -> None:
        self.name = name
        self.expect_loss = expect_loss
        self.messages: list[OBJ] = []
        self.closed_code: int | None = None
        self.lost: trio_websocket.ConnectionClosed | None = None
        self.changed = trio.Event()
        self.scope = trio.CancelScope()
        self.finished = trio.Event()

    def leave(self) -> None:
        """Disconnect now (as a client that goes away would)."""
        self.scope.cancel()

    def closed(self, series: str) -> list[OBJ]:
        """The closed candles of ``series`` as received, batched or one by one."""
        out: list[OBJ] = []
        for m in self.messages:
            if m.get("series_id") != series:
                continue
            if m["type"] == "candles_batch":
                out.extend(m["candles"])
            elif m["type"] == "candle_closed":
                out.append(m["candle"])
        return out

    def times(self, series: str) -> list[int]:
        return [c["candle_time"] for c in self.closed(series)]

    def closed_candles(self, series: str) -> dict[int, OBJ]:
        """candle_time → the last closed candle received for it."""
        return {c["candle_time"]: c for c in self.closed(series)}

    def event_ids(self, series: str) -> list[int]:
        return [
            m["event_id"]
            for m in self.messages
            if m["type"] == "system" and m.get("series_id") == series and "event_id" in m
        ]

    def of_type(self, kind: str) -> list[OBJ]:
        return [m for m in self.messages if m["type"] == kind]

    async def run(
        self,
        url: str,
        subscribe: list[OBJ],
        *,
        task_status: trio.TaskStatus[trio_websocket.WebSocketConnection] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        try:
            with self.scope:
                await self._run(url, subscribe, task_status)
        finally:
            self.finished.set()

    async def _run(
        self,
        url: str,
        subscribe: list[OBJ],
        task_status: trio.TaskStatus[trio_websocket.WebSocketConnection],
    ) -> None:
        # the package's client: it owns and always closes its socket (a killed edge too), and
        # a close racing the daemon's read-proof ping ends cleanly (python-trio/trio-websocket#184)
        async with open_websocket_client(url) as ws:
            try:
                await self._talk(ws, subscribe, task_status)
            except trio_websocket.ConnectionClosed as exc:
                self.lost = exc
                self.closed_code = exc.reason.code if exc.reason else None
                self.changed.set()
        if self.lost is not None and not self.expect_loss:
            raise self.lost  # outside the client, not inside its exception group

    async def _talk(
        self,
        ws: trio_websocket.WebSocketConnection,
        subscribe: list[OBJ],
        task_status: trio.TaskStatus[trio_websocket.WebSocketConnection],
    ) -> None:
        for message in subscribe:
            await ws.send_message(dumps(message))
        if subscribe:
            await ws.send_message(dumps({"type": "ping"}))
            while not self.of_type("pong"):
                self.messages.append(loads(await ws.get_message()))
        task_status.started(ws)
        while True:
            self.messages.append(loads(await ws.get_message()))
            self.changed.set()
            self.changed = trio.Event()

    async def wait_until(self, condition: Callable[[], bool], within: float) -> bool:
        """Whether ``condition`` came true within ``within`` seconds (checked after every
        message; given up early once the server closed the connection)."""
        with trio.move_on_after(within):
            while not condition():
                if self.closed_code is not None:
                    return condition()
                await self.changed.wait()
            return True
        return condition()
