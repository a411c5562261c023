"""The one store interface both backends implement (DESIGN §10), as Protocols.

``CandleStore`` (SQLite, ``store/sqlite.py``) and ``PostgresStore`` (``store/postgres.py``)
both satisfy :class:`MarketStore`, and their transaction views (``StoreTxn``,
``PgStoreTxn``) both satisfy :class:`WriteTxn`; ``tests/store_pg`` checks it with mypy.
Code that should run on either backend (the pipeline, the hub, the HTTP API, the records)
can name these instead of the SQLite classes.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Protocol, TypeVar

from tradecanvas.model import Candle
from tradecanvas.store.types import SeriesHead, Source, StoredCandle, StoredEvent, UpsertOutcome

T = TypeVar("T")


class WriteTxn(Protocol):
    """The synchronous view of the store inside one write transaction (a worker thread)."""

    def upsert(
        self, series_id: str, candles: Sequence[Candle], source: Source, *, complete: bool = True
    ) -> list[UpsertOutcome]: ...

    @property
    def sequence(self) -> int: ...

    def write_rows(self, rows: Sequence[tuple[str, StoredCandle]]) -> None: ...

    def first_time(self, series_id: str) -> int | None: ...

    def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]: ...

    def last_before(self, series_id: str, t: int) -> StoredCandle | None: ...

    def head_time(self, series_id: str) -> int | None: ...

    def heads_of(self, series_ids: Collection[str]) -> dict[str, int]: ...

    def append_event(
        self, series_id: str, event: str, data: Mapping[str, object], created_at: float
    ) -> int: ...

    def prune_events(self, keep: int, created_after: float) -> int: ...

    def get_meta(self, key: str) -> str | None: ...

    def set_meta(self, key: str, value: str) -> None: ...


class MarketStore(Protocol):
    """A store the daemon can run on: every method is a trio checkpoint; failures of the
    engine are raised as ``StoreError``."""

    @property
    def closed(self) -> bool: ...

    def write_running_for(self) -> float: ...

    async def aclose(self) -> None: ...

    async def write(self, fn: Callable[[WriteTxn], T], *, quick: bool = False) -> T: ...

    async def upsert(
        self, series_id: str, candles: Sequence[Candle], source: Source, *, complete: bool = True
    ) -> list[UpsertOutcome]: ...

    async def tail(self, series_id: str, limit: int) -> list[Candle]: ...

    async def since(self, series_id: str, since: int, limit: int) -> list[Candle]: ...

    async def before(self, series_id: str, before: int, limit: int) -> list[Candle]: ...

    async def window(
        self, series_id: str, since: int | None, before: int | None, limit: int
    ) -> list[StoredCandle]: ...

    async def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]: ...

    async def head_time(self, series_id: str) -> int | None: ...

    async def heads(self) -> dict[str, SeriesHead]: ...

    async def events_after(
        self, after: int, series_ids: Sequence[str] | None = None, limit: int = 1000
    ) -> list[StoredEvent]: ...

    async def events_pruned_upto(self) -> int: ...

    async def events_newest_id(self) -> int: ...

    async def set_meta(self, key: str, value: str) -> None: ...

    async def get_meta(self, key: str) -> str | None: ...
