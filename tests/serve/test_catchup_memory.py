"""What a catch-up held up by a client that does not read keeps in memory: only the bytes not
yet written — not the candles read from the store, nor their messages and encodings (64 such
clients held about 6 MB each, 400 MB in all, before; about 1 MB each after)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Sequence
from typing import final

import attrs
import pytest
import trio
import trio.testing

from tests.conftest import flat_minutes
from tests.serve.test_hub import T0, MemoryReader, make_hub
from tests.serve.test_publisher import StuckFrames, closed_times, framed
from tests.serve.test_ws_server import SERIES_1M
from tradecanvas.model import Candle
from tradecanvas.serve.publisher import WRITE_CHUNK_BYTES

HISTORY = list(flat_minutes(T0 - 600 * 60, 600))


@final
class FreshReader(MemoryReader):
    """A MemoryReader whose reads return new Candle objects (as a store's do), each watched
    by a weak reference."""

    def __init__(self, candles: Sequence[Candle]) -> None:
        super().__init__(candles)
        self.read: list[weakref.ref[Candle]] = []

    def _fresh(self, candles: list[Candle]) -> list[Candle]:
        out = [attrs.evolve(c) for c in candles]
        self.read.extend(weakref.ref(c) for c in out)
        return out

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        return self._fresh(await super().tail(series_id, limit))

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        return self._fresh(await super().since(series_id, since, limit))

    def alive(self) -> int:
        gc.collect()
        return sum(ref() is not None for ref in self.read)


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("since", [None, HISTORY[0].candle_time - 60])
async def test_a_catch_up_waiting_on_a_client_that_does_not_read_holds_no_candles(
    batch: bool, since: int | None
) -> None:
    reader = FreshReader(HISTORY)
    hub = make_hub(reader, catchup_limit=250)
    stuck = StuckFrames()
    async with framed(hub, stuck) as subscriber:
        hub.subscribe(subscriber, SERIES_1M, since, batch=batch)
        await trio.testing.wait_all_tasks_blocked()
        assert stuck.written_to and not stuck.data  # the first write waits on the client
        assert reader.read, "the catch-up was read from the store"
        assert reader.alive() == 0
        stuck.reading.set()
        await trio.testing.wait_all_tasks_blocked()
    expected = HISTORY[-250:] if since is None else HISTORY
    assert closed_times(stuck.messages()) == [c.candle_time for c in expected]
    assert max(stuck.writes) < WRITE_CHUNK_BYTES + 32 * 1024
