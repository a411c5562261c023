"""Which store backend a location names: a ``postgresql://`` (or ``postgres://``) URL opens
the PostgreSQL store, anything else is the SQLite file's path (DESIGN §10)."""

from __future__ import annotations

from pathlib import Path

from tradecanvas.service_urls import POSTGRES_URL_SCHEMES
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.postgres import PostgresStore, describe_url
from tradecanvas.store.sqlite import CandleStore


def is_database_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.strip().lower().startswith(POSTGRES_URL_SCHEMES)


def store_location(db_path: Path, database_url: str | None) -> str | Path:
    """The flags' choice: ``TRADE_CANVAS_DATABASE_URL`` when set, else the SQLite path."""
    return database_url if database_url else db_path


async def open_store(location: str | Path, *, writes: bool = True) -> MarketStore:
    """Open (and migrate) the store at ``location``; ``writes=False`` for a caller that only
    reads. Raises StoreError."""
    if is_database_url(location):
        return await PostgresStore.open(str(location).strip())
    return await CandleStore.open(location, writes=writes)


def describe_location(location: str | Path) -> str:
    """The store's location for log lines: the SQLite path, or the URL without its password."""
    return describe_url(str(location).strip()) if is_database_url(location) else str(location)
