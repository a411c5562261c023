"""The candle reads both stores share: ``range``, one window query
(:meth:`WindowReads.window`, what the HTTP API reads, with the rows' ``complete`` marks) and
``tail``, ``since`` and ``before`` as its views. A store supplies its placeholder and
:meth:`WindowReads.select`."""

from __future__ import annotations

import abc
from typing import ClassVar

from tradecanvas.model import Candle
from tradecanvas.store.types import StoredCandle


class WindowReads(abc.ABC):
    placeholder: ClassVar[str]  # the driver's parameter mark: "?" (sqlite3), "%s" (psycopg)

    @abc.abstractmethod
    async def select(self, where: str, params: tuple[object, ...]) -> list[StoredCandle]:
        """The rows of ``series_id = <mark> AND <where>``; ``params`` begin with the series."""

    async def window(
        self, series_id: str, since: int | None, before: int | None, limit: int
    ) -> list[StoredCandle]:
        """The candles between ``since`` and ``before`` (each exclusive; None: no bound),
        with their ``complete`` marks, ascending: with ``since`` the oldest ``limit`` of
        them, without it the newest."""
        mark = self.placeholder
        kept = [
            (f"candle_time {op} {mark}", value)
            for op, value in ((">", since), ("<", before))
            if value is not None
        ]
        newest = since is None
        where = " AND ".join(c for c, _ in kept) or "TRUE"
        order = "DESC" if newest else "ASC"
        rows = await self.select(
            f"{where} ORDER BY candle_time {order} LIMIT {mark}",
            (series_id, *(v for _, v in kept), limit),
        )
        return rows[::-1] if newest else rows

    async def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        """Candles with ``start <= candle_time < end``, ascending, with source and mark."""
        mark = self.placeholder
        where = f"candle_time >= {mark} AND candle_time < {mark} ORDER BY candle_time"
        return await self.select(where, (series_id, start, end))

    async def tail(self, series_id: str, limit: int) -> list[Candle]:
        """The newest ``limit`` candles, ascending."""
        return [r.candle for r in await self.window(series_id, None, None, limit)]

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]:
        """Up to ``limit`` candles with ``candle_time > since`` (exclusive), ascending."""
        return [r.candle for r in await self.window(series_id, since, None, limit)]

    async def before(self, series_id: str, before: int, limit: int) -> list[Candle]:
        """The newest ``limit`` candles with ``candle_time < before`` (exclusive), ascending."""
        return [r.candle for r in await self.window(series_id, None, before, limit)]
