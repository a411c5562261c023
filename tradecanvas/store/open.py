"""Which store backend a location names: a ``postgresql://`` (or ``postgres://``) URL opens
the PostgreSQL store, anything else is the SQLite file's path (DESIGN §10); and how
``serve`` opens it (:func:`open_served_store`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Final

import trio

from tradecanvas.errors import StoreError
from tradecanvas.service_urls import POSTGRES_URL_SCHEMES
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.postgres import PostgresStore, describe_url
from tradecanvas.store.schema import SchemaChange
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.writer_lock import take_pg_serve_lock

log = logging.getLogger(__name__)


def is_database_url(location: str | Path) -> bool:
    return isinstance(location, str) and location.strip().lower().startswith(POSTGRES_URL_SCHEMES)


def store_location(db_path: Path, database_url: str | None) -> str | Path:
    """The flags' choice: ``TRADE_CANVAS_DATABASE_URL`` when set, else the SQLite path."""
    return database_url if database_url else db_path


async def open_store(
    location: str | Path, *, writes: bool = True, lock: bool = False, shared: bool = False
) -> MarketStore:
    """Open (and migrate) the store at ``location``; ``writes=False`` for a caller that only
    reads; ``lock``: take ``serve``'s single-writer lock first (``store/writer_lock.py``,
    only for a daemon that ingests), ``shared`` on PostgreSQL (role ingest: every ingest
    node holds it, a role ``all`` daemon is kept out; a SQLite lock is exclusive). Raises
    StoreError (StoreInUse, StoreTooNew)."""
    if not is_database_url(location):
        return await CandleStore.open(location, writes=writes, lock=lock)
    url = str(location).strip()
    if not (lock and shared):
        return await PostgresStore.open(url, lock=lock, writes=writes)
    held = await take_pg_serve_lock(url, shared=True)
    try:
        store = await PostgresStore.open(url)
    except BaseException:
        held.close()
        raise
    store.lock = held  # kept by the daemon (hold), let go by the store's aclose
    return store


# the meta record ``migrate-store`` keeps on its target while it copies (docs/operations.md)
MIGRATION_MARK: Final = "migrate_store.in_progress"


async def refuse_unfinished_migration(store: MarketStore, where: str) -> None:
    """StoreError when a ``migrate-store`` into this store did not finish: a daemon writing
    to the partial copy would take event ids the rerun needs."""
    source = await store.get_meta(MIGRATION_MARK)
    if source is not None:
        raise StoreError(
            f"candle store {where}: a migrate-store into this database did not finish (from"
            f" {source}): run the same migrate-store command again"
        )


def describe_location(location: str | Path) -> str:
    """The store's location for log lines: the SQLite path, or the URL without its password."""
    return describe_url(str(location).strip()) if is_database_url(location) else str(location)


def takes_writer_lock(location: str | Path, role: str) -> bool:
    """Whether ``serve`` of ``role`` takes the store's single-writer lock: every daemon that
    ingests (all, ingest; not edge)."""
    return role in ("all", "ingest")


def shares_writer_lock(location: str | Path, role: str) -> bool:
    """Whether that lock is taken shared: role ingest on PostgreSQL, where several ingest
    nodes run (the Redis lease and its fencing token pick the writer) and keep a role
    ``all`` daemon out, as it keeps them out (``store/lock_holder.py``). On SQLite an
    ingest node's lock is exclusive, as role all's."""
    return role == "ingest" and is_database_url(location)


async def open_served_store(location: str | Path, role: str) -> MarketStore:
    """``serve``'s open: the single-writer lock first (:func:`takes_writer_lock`), the
    migration, then the refusal of an unfinished ``migrate-store``; logs what the migration
    did (one line). Raises StoreError (StoreInUse, StoreTooNew)."""
    store = await open_store(
        location,
        lock=takes_writer_lock(location, role),
        shared=shares_writer_lock(location, role),
    )
    try:
        await refuse_unfinished_migration(store, describe_location(location))
    except BaseException:
        with trio.CancelScope(shield=True):
            await store.aclose()
        raise
    change = schema_change(store)
    if change is not None:
        log.info("%s", change.line())
    return store


def schema_change(store: MarketStore) -> SchemaChange | None:
    """What opening ``store`` did to its schema (None: a store of neither backend)."""
    return store.schema if isinstance(store, CandleStore | PostgresStore) else None
