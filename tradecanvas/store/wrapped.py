"""A MarketStore that wraps another and changes only how writes run: every read, ``upsert``
and ``set_meta`` go to the wrapped store, the last two through the subclass's ``write``.
``bus.leader.FencedStore`` (the fencing token) and ``serve.event_tail.OwnWrites`` (its own
event ids) build on it."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TypeVar

from tradecanvas.model import Candle
from tradecanvas.store.interface import MarketStore, WriteTxn
from tradecanvas.store.types import SeriesHead, Source, StoredCandle, StoredEvent, UpsertOutcome

T = TypeVar("T")


class WrappedStore(ABC):
    """``inner`` does everything but :meth:`write`, which a subclass defines."""

    def __init__(self, inner: MarketStore) -> None:
        self.inner = inner

    @abstractmethod
    async def write(self, fn: Callable[[WriteTxn], T], *, quick: bool = False) -> T: ...

    async def upsert(
        self, series_id: str, candles: Sequence[Candle], source: Source, *, complete: bool = True
    ) -> list[UpsertOutcome]:
        return await self.write(
            lambda txn: txn.upsert(series_id, candles, source, complete=complete)
        )

    async def set_meta(self, key: str, value: str) -> None:
        await self.write(lambda txn: txn.set_meta(key, value))

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def write_running_for(self) -> float:
        return self.inner.write_running_for()

    async def aclose(self) -> None:
        await self.inner.aclose()

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        return await self.inner.tail(series_id, limit)

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        return await self.inner.since(series_id, since, limit)

    async def before(self, series_id: str, before: int, limit: int) -> list[Candle]:
        return await self.inner.before(series_id, before, limit)

    async def window(
        self, series_id: str, since: int | None, before: int | None, limit: int
    ) -> list[StoredCandle]:
        return await self.inner.window(series_id, since, before, limit)

    async def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        return await self.inner.range(series_id, start, end)

    async def head_time(self, series_id: str) -> int | None:
        return await self.inner.head_time(series_id)

    async def heads(self) -> dict[str, SeriesHead]:
        return await self.inner.heads()

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = 1000
    ) -> list[StoredEvent]:
        return await self.inner.events_after(after, series_ids, limit)

    async def events_pruned_upto(self) -> int:
        return await self.inner.events_pruned_upto()

    async def events_newest_id(self) -> int:
        return await self.inner.events_newest_id()

    async def get_meta(self, key: str) -> str | None:
        return await self.inner.get_meta(key)
