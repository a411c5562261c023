"""``tradecanvas migrate-store SQLITE_FILE POSTGRESQL_URL``: moves a SQLite store into
PostgreSQL (DESIGN §10), idempotently, with progress.

Every candle is upserted with its own source and ``complete`` mark, in batches of
``--batch`` per transaction, series by series in time order; then the event log, each event
under its own id (so subscribers' ``events_after`` cursors stay valid, and ids given later
stay above them); then the meta records (derivation fingerprint, unresolved holes, a
Binance ban, the retention's mark). Running it again changes nothing (every candle
UNCHANGED, every event already there). Candles PostgreSQL holds with other values are
replaced by the SQLite file's (REVISED in the summary). An event whose id PostgreSQL holds
already is counted "already there" when it is the same event.

Before anything is written the target's event log is checked: an event the SQLite file does
not hold identically under the same id (the database has events of its own: a daemon or an
``import`` wrote to it) refuses the run with exit 1, the target unchanged. An event the file
no longer holds, under an id at or below the file's retention mark, is accepted when the
target also holds events the file still holds (an earlier run copied it, the file's retention
dropped it since). A target with candles but no events is merged into: the SQLite file's
candle wins where both hold one (REVISED), the others stay.
A daemon writing to the target while the run goes on is still caught at the event log, then
with the candles copied (the message says so).

The SQLite file is migrated forward when its schema is older, then only read (its daemon
may keep running: a later run copies what it added). Ctrl-C stops after the batch being
committed; what was copied stays and the next run goes on from there.

While it runs the target carries a meta record (``MIGRATION_MARK``, the SQLite file's path),
written before the first candle and deleted in the last transaction: a run killed half-way
leaves it, and ``serve`` refuses to open a store carrying it until a rerun completes.

Exit codes: 0 copied (a second run: nothing changed); 1 the target's event log has events
of its own (nothing written, unless a daemon wrote them during the run); 2 bad arguments
(no such SQLite file, not a PostgreSQL URL); 3 either store failed (what was committed
stays: run it again); 4 the SQLite file's or the database's schema is newer than this
release; 130 Ctrl-C, 143 SIGTERM (the batch in flight is finished; a second signal exits
at once).
"""

from __future__ import annotations

import argparse
import functools
import logging
import sqlite3
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import groupby
from pathlib import Path
from typing import Final, TextIO

import attrs
import orjson
import trio

from tradecanvas.errors import ExitCode, StoreError
from tradecanvas.service_urls import parse_database_url
from tradecanvas.store.open import MIGRATION_MARK
from tradecanvas.store.pg_txn import PgStoreTxn
from tradecanvas.store.postgres import PostgresStore, describe_url
from tradecanvas.store.schema import SCHEMA_VERSION
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.txn import events_pruned_upto, select_candles, select_events
from tradecanvas.store.types import StoredCandle, StoredEvent, UpsertOutcome
from tradecanvas.tools.exit_codes import ExitCodeTable
from tradecanvas.tools.progress import Progress
from tradecanvas.tools.signals import StopOnSignal

log = logging.getLogger(__name__)
# Ctrl-C/SIGTERM: stop after the batch in flight; a second one: at once
_SIGNALS: Final = StopOnSignal("migrate-store", "the batch", log)

DEFAULT_BATCH: Final = 50_000
# the first bytes of every SQLite database file
SQLITE_HEADER: Final = b"SQLite format 3\x00"

EXIT_CODES: Final[ExitCodeTable] = (
    (ExitCode.OK, "everything was copied (again: nothing changed)"),
    (ExitCode.FAILED, "the target's event log has events of its own: nothing was written"),
    (ExitCode.USAGE, "bad arguments: no such SQLite file (or not one), a bad PostgreSQL URL"),
    (ExitCode.STORE_FAILURE, "either store failed; what was committed stays, run it again"),
    (ExitCode.STORE_TOO_NEW, "the store's schema is newer than this release (a rollback)"),
    (ExitCode.INTERRUPTED, "Ctrl-C: the batch being committed is finished, the rest is not"),
    (ExitCode.TERMINATED, "SIGTERM: as Ctrl-C"),
)


@attrs.define
class MigrationTally:
    """What a run did: candles per outcome, events copied or already there, meta entries."""

    candles: Counter[UpsertOutcome] = attrs.field(factory=Counter)
    series: int = 0
    events_copied: int = 0
    events_present: int = 0
    meta: int = 0

    def summary(self) -> str:
        return (
            f"{self.series} series: {self.candles[UpsertOutcome.NEW]:,} new,"
            f" {self.candles[UpsertOutcome.UNCHANGED]:,} unchanged,"
            f" {self.candles[UpsertOutcome.REVISED]:,} revised candles;"
            f" {self.events_copied:,} events copied, {self.events_present:,} already there;"
            f" {self.meta} meta entries"
        )


def _upsert_as_stored(
    series_id: str, rows: Sequence[StoredCandle], txn: PgStoreTxn
) -> list[UpsertOutcome]:
    outcomes: list[UpsertOutcome] = []
    # runs of the same source and mark: one upsert each (usually the whole batch)
    for (source, complete), run in groupby(rows, key=lambda s: (s.source, s.complete)):
        outcomes += txn.upsert(series_id, [s.candle for s in run], source, complete=complete)
    return outcomes


class EventIdTaken(Exception):
    """The target's event log holds another event under an id: it has events of its own.

    ``theirs`` is the SQLite file's event under that id (None: it has none there);
    ``written`` says whether the run had copied candles before it found it (only when a
    daemon wrote to the target while the run went on: the check before the first write
    finds any other)."""

    def __init__(self, event_id: int, theirs: StoredEvent | None, *, written: bool) -> None:
        self.event_id, self.written = event_id, written
        source = (
            "the SQLite file has none under it"
            if theirs is None
            else f"the SQLite file's is {theirs.event} of {theirs.series_id}"
        )
        outcome = (
            "its candles were copied before a daemon wrote this event to the target;"
            " nothing of the event log was copied in this batch"
            if written
            else "nothing was written to the target"
        )
        super().__init__(
            f"the target's event log holds another event under event_id {event_id}"
            f" ({source}): it has events of its own, so copying under the same ids would"
            " lose some and moving the ids would break subscribers' events_after cursors."
            f" Migrate into a new database, before any daemon writes to it; {outcome}"
        )


def _import_events(events: Sequence[StoredEvent], txn: PgStoreTxn) -> int:
    copied = 0
    for event in events:
        outcome = txn.import_event(event)
        if outcome is None:
            raise EventIdTaken(event.event_id, event, written=True)
        copied += outcome
    return copied


def _same(a: StoredEvent, b: StoredEvent) -> bool:
    """The same event, as :meth:`PgStoreTxn.import_event` compares them."""
    return (a.series_id, a.event, dict(a.data)) == (b.series_id, b.event, dict(b.data))


def _source_events(conn: sqlite3.Connection, ids: Sequence[int]) -> dict[int, StoredEvent]:
    """The SQLite file's events under ``ids`` (those it holds)."""
    found: dict[int, StoredEvent] = {}
    for start in range(0, len(ids), 500):  # well below SQLite's limit of bound parameters
        chunk = ids[start : start + 500]
        cur = conn.execute(
            "SELECT event_id, series_id, event, data, created_at FROM events"  # noqa: S608
            f" WHERE event_id IN ({', '.join('?' * len(chunk))})",
            chunk,
        )
        for i, sid, name, data, created in cur:
            found[int(i)] = StoredEvent(
                int(i), str(sid), str(name), orjson.loads(data), float(created)
            )
    return found


async def _check_event_log(conn: sqlite3.Connection, target: PostgresStore, batch: int) -> None:
    """Raise :class:`EventIdTaken` (before anything is written) when the target's event
    log holds an event the SQLite file does not hold identically under the same id. An
    event the file no longer holds, under an id at or below the file's retention mark, is
    one an earlier run copied before the file's retention dropped it: accepted when the
    target also holds events the file still holds (the same log); with none, the target's
    log cannot be told from another database's and is refused."""
    pruned = await trio.to_thread.run_sync(events_pruned_upto, conn)
    after, unverified, shared = 0, None, False
    while ours := await target.events_after(after, None, batch):
        ids = [e.event_id for e in ours]
        theirs = await trio.to_thread.run_sync(_source_events, conn, ids)
        for event in ours:
            source = theirs.get(event.event_id)
            if source is None and event.event_id <= pruned:
                unverified = event.event_id if unverified is None else unverified
            elif source is None or not _same(event, source):
                raise EventIdTaken(event.event_id, source, written=False)
            else:
                shared = True
        after = ours[-1].event_id
    if unverified is not None and not shared:
        raise EventIdTaken(unverified, None, written=False)


def _series_counts(conn: sqlite3.Connection) -> list[tuple[str, int]]:
    cur = conn.execute("SELECT series_id, COUNT(*) FROM candles GROUP BY series_id ORDER BY 1")
    return [(str(sid), int(n)) for sid, n in cur]


def _meta(conn: sqlite3.Connection) -> list[tuple[str, str]]:
    return [(str(k), str(v)) for k, v in conn.execute("SELECT key, value FROM meta ORDER BY 1")]


async def migrate_store(
    sqlite_path: Path,
    target: PostgresStore,
    *,
    batch: int = DEFAULT_BATCH,
    progress: Callable[[str, int, int], None] = lambda sid, done, total: None,
) -> MigrationTally:
    """Copy everything in ``sqlite_path`` into ``target``; ``progress(series, done, total)``
    after each batch. Raises StoreError."""
    if await trio.to_thread.run_sync(_schema_version, sqlite_path) != SCHEMA_VERSION:
        lite = await CandleStore.open(sqlite_path)  # migrates an older file, refuses a newer
        await lite.aclose()

    conn = await trio.to_thread.run_sync(_read_only, sqlite_path)
    try:
        # a database with events of its own is refused before anything is written to it
        await _check_event_log(conn, target, batch)
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"reading {sqlite_path} failed: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    tally = MigrationTally()
    # "in progress" until the last transaction: serve refuses a target carrying it (a
    # daemon's events on a partial copy would take ids the rerun needs)
    marked_before = await target.get_meta(MIGRATION_MARK) is not None
    await target.write(lambda txn: txn.set_meta(MIGRATION_MARK, str(sqlite_path)))
    try:
        for sid, total in await trio.to_thread.run_sync(_series_counts, conn):
            tally.series += 1
            cursor, done = None, 0
            progress(sid, done, total)  # the clock of its rate starts before the first batch
            while True:
                where, params = (
                    ("1 ORDER BY candle_time LIMIT ?", (sid, batch))
                    if cursor is None
                    else ("candle_time > ? ORDER BY candle_time LIMIT ?", (sid, cursor, batch))
                )
                rows = await trio.to_thread.run_sync(select_candles, conn, where, params)
                if not rows:
                    break
                outcomes = await target.write(functools.partial(_upsert_as_stored, sid, rows))
                tally.candles.update(outcomes)
                cursor, done = rows[-1].candle.candle_time, done + len(rows)
                progress(sid, done, total)
        after = 0
        while events := await trio.to_thread.run_sync(select_events, conn, after, None, batch):
            copied = await target.write(functools.partial(_import_events, events))
            tally.events_copied += copied
            tally.events_present += len(events) - copied
            after = events[-1].event_id
        entries = await trio.to_thread.run_sync(_meta, conn)

        def set_all(txn: PgStoreTxn) -> None:
            for key, value in entries:
                txn.set_meta(key, value)
            txn.delete_meta(MIGRATION_MARK)  # complete

        await target.write(set_all)
        tally.meta = len(entries)
    except sqlite3.Error as exc:
        raise StoreError(f"reading {sqlite_path} failed: {exc}") from exc
    except EventIdTaken:
        # not a copy that a rerun finishes: a database of its own, left as marked as it was
        if not marked_before:
            await target.write(lambda txn: txn.delete_meta(MIGRATION_MARK))
        raise
    finally:
        conn.close()
    return tally


def read_only_uri(path: Path) -> str:
    """SQLite's URI opening ``path`` read-only: the absolute path percent-encoded, so that a
    ``#``, ``?`` or ``%`` in it stays part of the name (unquoted, ``a#b.sqlite3`` opened a
    new, empty file ``a`` read-write)."""
    return f"{path.absolute().as_uri()}?mode=ro"


def _read_only(path: Path) -> sqlite3.Connection:
    try:
        return sqlite3.connect(read_only_uri(path), uri=True, check_same_thread=False)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc


def _schema_version(path: Path) -> int:
    """The file's schema version, read only (a copy the user may not write is fine)."""
    conn = _read_only(path)
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.Error as exc:
        raise StoreError(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("sqlite_file", type=Path, help="the SQLite store to copy from")
    parser.add_argument("database_url", help="the PostgreSQL store: postgresql://…")
    parser.add_argument(
        "--batch",
        type=int,
        default=DEFAULT_BATCH,
        help=f"candles per transaction (default {DEFAULT_BATCH:,})",
    )


async def _run(args: argparse.Namespace, err: TextIO) -> MigrationTally:
    target = await PostgresStore.open(args.database_url)
    # bars on a terminal, else a plain line per series at most every few seconds
    display = Progress(err, log=None, verb="migrate-store")
    started: set[str] = set()

    def progress(sid: str, done: int, total: int) -> None:
        if sid not in started:
            started.add(sid)
            display.start(sid, total)
        display.update(sid, done)

    caught: list[int] = []
    work = trio.CancelScope()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(_SIGNALS.watch, work, caught)
            with work, display.capture_logs():
                tally = await migrate_store(
                    args.sqlite_file, target, batch=args.batch, progress=progress
                )
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # the run's own failure (the signal watch raises nothing), as migrate_store raised it
        if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
            raise group.exceptions[0] from None
        raise
    finally:
        display.finish()
        with trio.CancelScope(shield=True):
            await target.aclose()
    if caught:
        raise Interrupted(caught[0])
    return tally


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped the run after the batch in flight."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _not_sqlite(path: Path) -> str | None:
    """What keeps ``path`` from being a SQLite file to migrate, None when nothing does."""
    if path.is_dir():
        return "a folder, not a SQLite file"
    if not path.is_file():
        return "no such file"
    with path.open("rb") as file:
        if file.read(len(SQLITE_HEADER)) != SQLITE_HEADER:
            return "not a SQLite file"
    return None


def run_migrate_store(
    args: argparse.Namespace, *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """Run the command with :func:`configure_parser`'s arguments; one of :data:`EXIT_CODES`."""
    out = out or sys.stdout
    err = err or sys.stderr
    problem = _not_sqlite(args.sqlite_file)
    if problem is not None:
        err.write(f"tradecanvas migrate-store: {args.sqlite_file}: {problem}\n")
        return ExitCode.USAGE
    try:
        parse_database_url(str(args.database_url))
    except ValueError as exc:
        err.write(f"tradecanvas migrate-store: the target: {exc}\n")
        return ExitCode.USAGE
    if args.batch < 1:
        err.write("tradecanvas migrate-store: --batch must be at least 1\n")
        return ExitCode.USAGE
    try:
        tally = trio.run(_run, args, err)
    except KeyboardInterrupt:  # before the signal watch started
        err.write("tradecanvas migrate-store: interrupted; run it again to finish\n")
        return ExitCode.INTERRUPTED
    except Interrupted as exc:
        err.write(
            "tradecanvas migrate-store: interrupted; what was copied stays, run it again to"
            " finish\n"
        )
        return ExitCode.for_signal(exc.signum)
    except StoreError as exc:
        err.write(f"tradecanvas migrate-store: {exc}\n")
        return ExitCode.for_store_error(exc)
    except EventIdTaken as exc:
        err.write(f"tradecanvas migrate-store: {exc}\n")
        return ExitCode.FAILED
    out.write(f"migrated {args.sqlite_file} to {describe_url(args.database_url)}: ")
    out.write(tally.summary() + "\n")
    return ExitCode.OK
