"""The synchronous view of the SQLite store inside one write transaction (a worker thread),
and the row conversions the readers share. Raises sqlite3 errors; the store translates them."""

from __future__ import annotations

import functools
import itertools
import sqlite3
from collections.abc import Collection, Mapping, Sequence
from decimal import Decimal
from typing import Final, final

import orjson

from tradecanvas.model import Candle
from tradecanvas.store.types import (
    Source,
    StoredCandle,
    StoredEvent,
    UpsertOutcome,
    plan_upsert,
)

# meta key: the highest event_id the retention has pruned
EVENTS_PRUNED_KEY: Final = "events_pruned_upto"
_COLUMNS: Final = (
    "candle_time, open, high, low, close, volume, quote_volume, trades,"
    " taker_buy_base, taker_buy_quote, source, complete"
)
# times per ``IN (...)`` read: well under SQLite's smallest limit on bound parameters (999)
_IN_CHUNK: Final = 500


# values of a ``candles`` row (``series_id`` and _COLUMNS)
_WIDTH: Final = 13
# rows per INSERT of write_rows: a statement of many rows runs as one ``sqlite3_step``, which
# releases the GIL once for all of them (an ``executemany`` releases and takes it back around
# every row: with another thread busy — the import's file reader, the event loop — each row
# waited for the GIL up to the interpreter's switch interval), and the VM starts once. 256 ×
# 13 values stays far under SQLite's limit on bound parameters (32,766)
ROWS_PER_STATEMENT: Final = 256


@functools.cache
def _insert_sql(rows: int) -> str:
    """``INSERT OR REPLACE`` of ``rows`` rows. Its rows are inserted in order, so a later one
    for the same key wins, as in an ``executemany``. write_rows uses ROWS_PER_STATEMENT and
    the powers of two below it: at most 9 statement texts, each prepared once (the
    connection's statement cache)."""
    marks = "(" + ", ".join("?" * _WIDTH) + ")"
    return (
        f"INSERT OR REPLACE INTO candles (series_id, {_COLUMNS}) VALUES "  # noqa: S608
        + ", ".join([marks] * rows)
    )


def _text(value: Decimal | None) -> str | None:
    return None if value is None else _plain(value)


def _row_values(rows: Sequence[tuple[str, StoredCandle]]) -> list[object]:
    """The ``candles`` columns of ``rows``, one after the other, for :func:`_insert_sql`
    (it runs for every candle written): decimals as plain text (see :func:`_plain`)."""
    values: list[object] = []
    extend = values.extend
    for series_id, (c, source, complete) in rows:
        o, h, lo, cl, v = str(c.open), str(c.high), str(c.low), str(c.close), str(c.volume)
        q, tb, tq = c.quote_volume, c.taker_buy_base, c.taker_buy_quote
        qt = None if q is None else str(q)
        tbt = None if tb is None else str(tb)
        tqt = None if tq is None else str(tq)
        # (an f-string of the five, the extras one by one: formatting a None costs more
        # than its check)
        if (
            "E" in f"{o}{h}{lo}{cl}{v}"
            or (qt is not None and "E" in qt)
            or (tbt is not None and "E" in tbt)
            or (tqt is not None and "E" in tqt)
        ):
            # str chose scientific notation somewhere: the store keeps plain decimals
            o, h, lo, cl, v = (_plain(x) for x in (c.open, c.high, c.low, c.close, c.volume))
            qt, tbt, tqt = _text(q), _text(tb), _text(tq)
        extend(
            (series_id, c.candle_time, o, h, lo, cl, v, qt, c.trades, tbt, tqt, source,
             1 if complete else 0)
        )  # fmt: skip
    return values


def plain_texts(values: Sequence[Decimal | None]) -> list[str | None]:
    """The text the store writes for each of ``values`` (as :func:`_row_values` writes a
    row's), a column at a time: ``str`` by one ``map``, and only for a column where it chose
    scientific notation somewhere, :func:`_plain` of each."""
    texts: list[str] = list(map(str, values))
    # (not ``None in values``: a Decimal's == with None is a Python call; no Decimal's text
    # holds "None")
    joined = "".join(texts)
    if "None" in joined:
        return list(map(_text, values))
    if "E" in joined:
        return list(map(_plain, values))  # type: ignore[arg-type]
    return texts  # type: ignore[return-value]


def _plain(value: Decimal) -> str:
    """The decimal's text without an exponent (``format(value, "f")``; ``str`` is three
    times faster and the same unless it chose scientific notation)."""
    text = str(value)
    return format(value, "f") if "E" in text else text


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _row_to_stored(row: tuple[object, ...]) -> StoredCandle:
    (t, o, h, lo, c, v, q, n, tb, tq, source, complete) = row
    candle = Candle(
        candle_time=t,  # type: ignore[arg-type]
        open=Decimal(o),  # type: ignore[arg-type]
        high=Decimal(h),  # type: ignore[arg-type]
        low=Decimal(lo),  # type: ignore[arg-type]
        close=Decimal(c),  # type: ignore[arg-type]
        volume=Decimal(v),  # type: ignore[arg-type]
        quote_volume=_dec(q),  # type: ignore[arg-type]
        trades=n,  # type: ignore[arg-type]
        taker_buy_base=_dec(tb),  # type: ignore[arg-type]
        taker_buy_quote=_dec(tq),  # type: ignore[arg-type]
    )
    return StoredCandle(candle, source, bool(complete))  # type: ignore[arg-type]


@final
class StoreTxn:
    """The synchronous view of the store inside one write transaction (a worker thread).

    This is the interface every backend's transaction offers (the pipeline uses nothing
    else): ``upsert``, ``write_rows``, ``range``, ``last_before``, ``head_time``,
    ``heads_of``, ``first_time``, ``sequence``, the event log (``append_event``,
    ``prune_events``) and ``get_meta``/``set_meta``. Issue 14 added ``write_rows`` (rows
    planned by the caller with :func:`plan_upsert`, many series in one statement),
    ``first_time`` and ``sequence`` (so the pipeline can keep a cache of recent bars);
    ``upsert`` keeps its contract and now reads the stored rows once and writes once.
    ``heads_of`` gives the pipeline the heads of a commit's series in one read.
    """

    def __init__(self, conn: sqlite3.Connection, sequence: int = 0) -> None:
        self._conn = conn
        self._sequence = sequence

    @property
    def sequence(self) -> int:
        """This write transaction's number: one more than the previous write transaction
        through the same store object, and more than that when the store may have changed
        under it since (another process or connection committed). A caller that remembers
        the number of its own last transaction and sees ``sequence == last + 1`` knows that
        nothing else was written in between, so what it cached of the store still holds
        (the pipeline's recent bars). A backend that cannot tell adds 2 every time."""
        return self._sequence

    def upsert(
        self,
        series_id: str,
        candles: Sequence[Candle],
        source: Source,
        *,
        complete: bool = True,
    ) -> list[UpsertOutcome]:
        """Insert or update ``candles``; per candle, was it new, unchanged or revised? The
        rule is :func:`plan_upsert`'s; a time given twice is judged against the first
        candle's row (as if upserted one after the other). One read of the stored rows at
        those times, then one ``executemany`` of the rows that change."""
        if not candles:
            return []
        existing = self._stored_at(series_id, [c.candle_time for c in candles])
        outcomes: list[UpsertOutcome] = []
        rows: list[tuple[str, StoredCandle]] = []
        for candle in candles:
            outcome, row = plan_upsert(existing.get(candle.candle_time), candle, source, complete)
            outcomes.append(outcome)
            if row is not None:
                rows.append((series_id, row))
                existing[candle.candle_time] = row
        self.write_rows(rows)
        return outcomes

    def _stored_at(self, series_id: str, times: Sequence[int]) -> dict[int, StoredCandle]:
        ordered = sorted(set(times))
        first, last = ordered[0], ordered[-1]
        step = min((b - a for a, b in itertools.pairwise(ordered)), default=1)
        if (last - first) // step < 2 * len(ordered):
            # dense: one range scan (holes in between cost less than one lookup each)
            return {s.candle.candle_time: s for s in self.range(series_id, first, last + 1)}
        found: dict[int, StoredCandle] = {}
        for i in range(0, len(ordered), _IN_CHUNK):
            chunk = ordered[i : i + _IN_CHUNK]
            marks = ", ".join("?" * len(chunk))
            rows = select_candles(self._conn, f"candle_time IN ({marks})", (series_id, *chunk))
            found.update((s.candle.candle_time, s) for s in rows)
        return found

    def write_rows(self, rows: Sequence[tuple[str, StoredCandle]]) -> None:
        """Insert or replace ``(series_id, row)`` pairs exactly as given (text of the
        decimals, source, mark; a later pair for the same key wins): for a caller that
        planned them with :func:`plan_upsert` against rows it knows, and writes the rows of
        many series at once. In multi-row ``INSERT`` statements (see :func:`_insert_sql`)."""
        if not rows:
            return
        execute = self._conn.execute
        at, left = 0, len(rows)
        while left:
            count = (
                ROWS_PER_STATEMENT if left >= ROWS_PER_STATEMENT else 1 << (left.bit_length() - 1)
            )
            # each statement's values built for it (not sliced from one list of all: a copy
            # of 13 references a row)
            execute(_insert_sql(count), _row_values(rows[at : at + count]))
            at, left = at + count, left - count

    def write_columns(
        self,
        series_id: str,
        source: Source,
        times: Sequence[int],
        texts: Sequence[Sequence[str | None]],
        trades: Sequence[int | None],
        complete: Sequence[bool],
    ) -> None:
        """Insert or replace rows of ``series_id`` given by column, as :meth:`write_rows`
        would write them: ``texts`` the open, high, low, close, volume, quote volume, taker
        buy base and quote volume columns, each as :func:`plain_texts` makes it from the
        Decimals (``tradecanvas import``'s short way: no ``Candle`` a row)."""
        o, h, lo, c, v, q, tb, tq = texts
        flat = list(
            itertools.chain.from_iterable(
                zip(
                    itertools.repeat(series_id), times, o, h, lo, c, v, q, trades, tb, tq,
                    itertools.repeat(source), map(int, complete),
                )
            )
        )  # fmt: skip
        execute = self._conn.execute
        at, left = 0, len(times)
        while left:
            count = (
                ROWS_PER_STATEMENT if left >= ROWS_PER_STATEMENT else 1 << (left.bit_length() - 1)
            )
            execute(_insert_sql(count), flat[at * _WIDTH : (at + count) * _WIDTH])
            at, left = at + count, left - count

    def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        """Stored candles with ``start <= candle_time < end``, ascending."""
        return select_candles(
            self._conn,
            "candle_time >= ? AND candle_time < ? ORDER BY candle_time",
            (series_id, start, end),
        )

    def last_before(self, series_id: str, t: int) -> StoredCandle | None:
        """The newest stored candle with ``candle_time < t``."""
        rows = select_candles(
            self._conn, "candle_time < ? ORDER BY candle_time DESC LIMIT 1", (series_id, t)
        )
        return rows[0] if rows else None

    def head_time(self, series_id: str) -> int | None:
        """The newest stored ``candle_time`` of the series (None: nothing stored)."""
        return head_time(self._conn, series_id)

    def heads_of(self, series_ids: Collection[str]) -> dict[str, int]:
        """The newest stored ``candle_time`` of each of ``series_ids`` that has a row (one
        with nothing stored is left out): one statement per _IN_CHUNK ids, a probe of the
        primary key for each id (its newest row), however many rows the store holds."""
        return heads_of(self._conn, series_ids)

    def first_time(self, series_id: str) -> int | None:
        """The oldest stored ``candle_time`` of the series (None: nothing stored)."""
        row = self._conn.execute(
            "SELECT MIN(candle_time) FROM candles WHERE series_id = ?", (series_id,)
        ).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    def append_event(
        self, series_id: str, event: str, data: Mapping[str, object], created_at: float
    ) -> int:
        """Add an entry to the event log; its ``event_id`` (above every id ever given)."""
        cur = self._conn.execute(
            "INSERT INTO events (series_id, event, data, created_at) VALUES (?, ?, ?, ?)",
            (series_id, event, orjson.dumps(dict(data)).decode(), created_at),
        )
        assert cur.lastrowid is not None
        return int(cur.lastrowid)

    def prune_events(self, keep: int, created_after: float) -> int:
        """Drop events beyond the newest ``keep`` or created before ``created_after``; return
        the highest event_id ever pruned (kept in meta: cursors at or below it are older than
        the retention)."""
        row = self._conn.execute(
            "SELECT COALESCE(MAX(event_id), 0) FROM events"
            " WHERE event_id <= (SELECT COALESCE(MAX(event_id), 0) FROM events) - ?"
            " OR created_at < ?",
            (keep, created_after),
        ).fetchone()
        upto = int(row[0])
        previous = int(self.get_meta(EVENTS_PRUNED_KEY) or 0)
        if upto > previous:
            self._conn.execute("DELETE FROM events WHERE event_id <= ?", (upto,))
            self.set_meta(EVENTS_PRUNED_KEY, str(upto))
            return upto
        return previous

    def get_meta(self, key: str) -> str | None:
        row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def set_meta(self, key: str, value: str) -> None:
        self._conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)", (key, value))


def select_events(
    conn: sqlite3.Connection, after: int, series_ids: Sequence[str] | None, limit: int
) -> list[StoredEvent]:
    """Events with ``event_id > after`` (of ``series_ids`` when given), ascending."""
    if series_ids is None:
        cur = conn.execute(
            "SELECT event_id, series_id, event, data, created_at FROM events"
            " WHERE event_id > ? ORDER BY event_id LIMIT ?",
            (after, limit),
        )
    else:
        marks = ", ".join("?" * len(series_ids))
        cur = conn.execute(
            "SELECT event_id, series_id, event, data, created_at FROM events"  # noqa: S608
            f" WHERE event_id > ? AND series_id IN ({marks}) ORDER BY event_id LIMIT ?",
            (after, *series_ids, limit),
        )
    return [StoredEvent(int(i), str(s), str(e), orjson.loads(d), float(c)) for i, s, e, d, c in cur]


def events_newest_id(conn: sqlite3.Connection) -> int:
    """AUTOINCREMENT's record of the highest id ever given (0 before the first event)."""
    row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'events'").fetchone()
    return 0 if row is None else int(row[0])


def events_pruned_upto(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (EVENTS_PRUNED_KEY,)).fetchone()
    return 0 if row is None else int(row[0])


def select_candles(
    conn: sqlite3.Connection, where: str, params: tuple[object, ...]
) -> list[StoredCandle]:
    cur = conn.execute(
        f"SELECT {_COLUMNS} FROM candles WHERE series_id = ? AND {where}",  # noqa: S608
        params,
    )
    return [_row_to_stored(row) for row in cur.fetchall()]


def head_time(conn: sqlite3.Connection, series_id: str) -> int | None:
    row = conn.execute(
        "SELECT MAX(candle_time) FROM candles WHERE series_id = ?", (series_id,)
    ).fetchone()
    return None if row is None or row[0] is None else int(row[0])


def heads_of(conn: sqlite3.Connection, series_ids: Collection[str]) -> dict[str, int]:
    """See :meth:`StoreTxn.heads_of`. A correlated ``MAX`` per id, not ``IN (…) GROUP BY``:
    SQLite takes the newest row of each series from the primary key only without the
    ``GROUP BY`` (with it, it reads every row of those series)."""
    ids = list(series_ids)
    heads: dict[str, int] = {}
    for i in range(0, len(ids), _IN_CHUNK):
        chunk = ids[i : i + _IN_CHUNK]
        marks = ", ".join(["(?)"] * len(chunk))
        cur = conn.execute(
            "SELECT v.column1, (SELECT MAX(candle_time) FROM candles"  # noqa: S608
            f" WHERE series_id = v.column1) FROM (VALUES {marks}) AS v",
            chunk,
        )
        heads.update((str(sid), int(t)) for sid, t in cur if t is not None)
    return heads
