"""The bound on the HTTP API's expensive reads (``GET /api/market/candles`` and
``/api/market/events``: up to 5,000 rows each, read, converted and encoded as JSON).

At most :data:`READ_SLOTS` run at once; up to :data:`READ_QUEUE` more wait for a slot, in
arrival order; a request beyond those is refused at once with 503 ``busy`` and
``Retry-After: 1``. So the memory such reads take while they are built is bounded whatever
the number of clients (an answer built and waiting for its client to read it is bounded in
time instead, by ``TRADE_CANVAS_HTTP_SEND_TIMEOUT_S``), and a burst costs the clients in the
queue a wait, not the daemon its memory or the other clients their latency for ever.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Final, final

import trio

from tradecanvas.serve.http_validation import RequestRefused

READ_SLOTS: Final = 4  # two cores: more at once only adds memory, not throughput
READ_QUEUE: Final = 64
RETRY_AFTER_S: Final = 1


@final
class ReadSlots:
    """At most ``slots`` reads at once, ``queue`` more waiting (see the module docstring)."""

    def __init__(self, slots: int = READ_SLOTS, queue: int = READ_QUEUE) -> None:
        self._limiter = trio.CapacityLimiter(slots)
        self._queue = queue

    @property
    def running(self) -> int:
        return self._limiter.borrowed_tokens

    @property
    def waiting(self) -> int:
        return self._limiter.statistics().tasks_waiting

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Hold a slot for the block; raises RequestRefused (503 ``busy``) when every slot
        is taken and the queue is full."""
        if self._limiter.available_tokens == 0 and self.waiting >= self._queue:
            raise RequestRefused(
                503,
                "busy",
                f"too many reads at once ({self.running} running, {self.waiting} waiting);"
                f" retry in {RETRY_AFTER_S} s",
                headers={"retry-after": str(RETRY_AFTER_S)},
            )
        async with self._limiter:
            yield
