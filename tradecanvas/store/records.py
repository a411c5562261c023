"""Records the daemon keeps in the store beside the candles: a Binance IP ban's end, and
each series' unresolved holes (see :class:`StoreHoleMemory`). Both live in the meta table."""

from __future__ import annotations

import contextlib
import logging
from typing import Final, final

import orjson

from tradecanvas.model import MARKETS, Market, SeriesId
from tradecanvas.store.interface import MarketStore

log = logging.getLogger(__name__)


@final
class StoreBanMemory:
    """Keeps the end of a Binance IP ban (418) or of a 429's Retry-After in the store's meta
    table, so that a restart inside it does not call Binance again (which would earn or
    lengthen a ban)."""

    KEY: Final = "rest_ban_until:"

    def __init__(self, store: MarketStore) -> None:
        self.store = store

    async def load(self) -> dict[Market, float]:
        result: dict[Market, float] = {}
        for market in MARKETS:
            text = await self.store.get_meta(self.KEY + market)
            if text is not None:
                with contextlib.suppress(ValueError):
                    result[market] = float(text)
        return result

    async def save(self, market: Market, until_unix: float) -> None:
        await self.store.write(lambda txn: txn.set_meta(self.KEY + market, repr(until_unix)))


@final
class StoreHoleMemory:
    """Keeps each series' unresolved holes (under candles committed while REST kept
    failing, or at shutdown) in the store's meta table, so a restart retries them instead
    of leaving them as holes for good.

    A hole is recorded in the transaction that commits the first candle above it, and
    forgotten in the one that commits the last candle a retry brought for it
    (:meth:`record` and :meth:`committed`, through ``IngestBatch.meta``), so neither a
    crash nor a failed commit can lose one. What is stored may briefly list a hole already
    filled: retrying it stores nothing.
    """

    KEY: Final = "unresolved_holes:"

    def __init__(self, store: MarketStore) -> None:
        self.store = store
        self._saved: dict[SeriesId, tuple[tuple[int, int], ...]] = {}

    async def load(self, sid: SeriesId) -> tuple[tuple[int, int], ...]:
        text = await self.store.get_meta(self.KEY + str(sid))
        holes: tuple[tuple[int, int], ...] = ()
        if text is not None:
            try:
                holes = tuple(
                    (int(start), int(end))
                    for start, end in orjson.loads(text)
                    if int(start) < int(end)
                )
            except (orjson.JSONDecodeError, TypeError, ValueError):
                log.warning("%s: ignoring unreadable unresolved holes %r", sid, text[:200])
        self._saved[sid] = holes
        return holes

    def record(self, sid: SeriesId, holes: tuple[tuple[int, int], ...]) -> tuple[str, str] | None:
        """The meta entry that stores ``holes`` for ``sid``; None when already stored."""
        if self._saved.get(sid, ()) == holes:
            return None
        return self.KEY + str(sid), orjson.dumps([list(hole) for hole in holes]).decode()

    def committed(self, sid: SeriesId, holes: tuple[tuple[int, int], ...]) -> None:
        """The transaction carrying :meth:`record`'s entry has committed."""
        self._saved[sid] = holes

    async def save(self, sid: SeriesId, holes: tuple[tuple[int, int], ...]) -> None:
        """Store ``holes`` on their own (when no candle of ``sid`` waits to carry them)."""
        entry = self.record(sid, holes)
        if entry is None:
            return
        key, value = entry
        await self.store.write(lambda txn: txn.set_meta(key, value))
        self._saved[sid] = holes
