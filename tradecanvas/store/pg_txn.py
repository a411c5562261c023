"""The synchronous view of the PostgreSQL store inside one write transaction (a worker
thread), and the queries the readers share. The PostgreSQL twin of ``store/txn.py``: the same
methods, the same outcomes. Raises psycopg errors; the store translates them.

Upserts are batched: one query fetches what is stored at the batch's times (an index range
scan for a dense batch, a join with the times for a sparse one), the outcome of each candle
is decided in Python exactly as the SQLite store decides it (``Candle.same_values``), then
the new candles go in with one ``INSERT … SELECT FROM unnest(…)`` (one array per column,
written as array literals: psycopg's list adapter costs ten times ``str``) and the revised or
merged ones with one more such statement ``… ON CONFLICT DO UPDATE``; ``write_rows`` (the
pipeline's rows) is one such upsert whatever the number of rows or series. A single candle
(the derivation upserts one bar at a time) takes one statement that inserts it unless a row
is there, and returns that row.

The store runs every write transaction in pipeline mode (``store/postgres.py``): a statement
whose answer is not needed (every write) goes out with the next one that is waited for, so
a transaction pays a round trip per read, not per statement. Reads that the pipeline would
make per series are made once: :meth:`PgStoreTxn.heads_of` gives the heads of all the
series a commit touches in one query (``RecentBars.learn_heads``); the meta table (the
fence, the derivation fingerprints) and the event counter come with the transaction's start
or from the store's copy (``store/postgres.py``), so ``get_meta`` and ``append_event`` wait
for nothing; its events and meta records go out as one statement each (:meth:`~PgStoreTxn.flush`).

Deciding in Python is safe because every write transaction holds the store's write lock
(``pg_schema.WRITE_LOCK_KEY``): no other writer can change a row between the read and the
write, just as SQLite's ``BEGIN IMMEDIATE`` allows one writer at a time.

Event ids come from the one-row ``event_counter``, read at the transaction's start under the
write lock and updated with each event in the same transaction: only the writer holding the
lock hands out ids, so they follow commit order (a later commit never publishes a smaller
id), and a rolled-back transaction never made its ids visible.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from decimal import Decimal
from typing import Final, final

import orjson
import psycopg

from tradecanvas.model import MINUTE, Candle
from tradecanvas.store.txn import EVENTS_PRUNED_KEY
from tradecanvas.store.types import Source, StoredCandle, StoredEvent, UpsertOutcome

Conn = psycopg.Connection[tuple[object, ...]]
Row = tuple[object, ...]

COLUMNS: Final = (
    "candle_time, open, high, low, close, volume, quote_volume, trades,"
    " taker_buy_base, taker_buy_quote, source, complete"
)
_PREFIXED: Final = ", ".join("c." + name.strip() for name in COLUMNS.split(","))
# parameters: series_id then a row; returns the row stored before, if any (then nothing
# was written). The write lock keeps anyone else from inserting between the two parts.
_INSERT_IF_ABSENT: Final = (
    "WITH params AS (SELECT %s::text AS series_id, %s::bigint AS candle_time,"  # noqa: S608
    " %s::numeric AS open, %s::numeric AS high, %s::numeric AS low, %s::numeric AS close,"
    " %s::numeric AS volume, %s::numeric AS quote_volume, %s::bigint AS trades,"
    " %s::numeric AS taker_buy_base, %s::numeric AS taker_buy_quote, %s::text AS source,"
    " %s::boolean AS complete),"
    f" old AS (SELECT {_PREFIXED} FROM candles c JOIN params p"
    "  ON c.series_id = p.series_id AND c.candle_time = p.candle_time),"
    f" ins AS (INSERT INTO candles (series_id, {COLUMNS}) SELECT * FROM params"
    "  WHERE NOT EXISTS (SELECT 1 FROM old))"
    " SELECT * FROM old"
)
# the head of each of the given series ids: a probe of the primary key per id
_HEADS_OF: Final = (
    "SELECT s.series_id,"
    " (SELECT MAX(c.candle_time) FROM candles c WHERE c.series_id = s.series_id)"
    " FROM unnest(%s::text[]) AS s(series_id)"
)
# many rows in one statement: one array per column, unnested server-side (a single
# statement is one plan and one round trip, where an executemany costs the server one
# statement per row)
_INSERT_ROWS: Final = (
    f"INSERT INTO candles (series_id, {COLUMNS})"  # noqa: S608
    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::numeric[], %s::numeric[],"
    " %s::numeric[], %s::numeric[], %s::numeric[], %s::numeric[], %s::bigint[],"
    " %s::numeric[], %s::numeric[], %s::text[], %s::boolean[])"
)
_ON_CONFLICT_UPDATE: Final = (
    " ON CONFLICT (series_id, candle_time) DO UPDATE SET"
    " open = excluded.open, high = excluded.high, low = excluded.low,"
    " close = excluded.close, volume = excluded.volume, quote_volume = excluded.quote_volume,"
    " trades = excluded.trades, taker_buy_base = excluded.taker_buy_base,"
    " taker_buy_quote = excluded.taker_buy_quote, source = excluded.source,"
    " complete = excluded.complete"
)
_UPSERT_ROWS: Final = _INSERT_ROWS + _ON_CONFLICT_UPDATE


def _num(value: object) -> Decimal:
    # psycopg loads NUMERIC as Decimal already, with the scale that was stored
    return value if isinstance(value, Decimal) else Decimal(str(value))


def _dec(value: object) -> Decimal | None:
    return None if value is None else _num(value)


def row_to_stored(row: Row) -> StoredCandle:
    (t, o, h, lo, c, v, q, n, tb, tq, source, complete) = row
    candle = Candle(
        candle_time=int(str(t)),
        open=_num(o),
        high=_num(h),
        low=_num(lo),
        close=_num(c),
        volume=_num(v),
        quote_volume=_dec(q),
        trades=None if n is None else int(str(n)),
        taker_buy_base=_dec(tb),
        taker_buy_quote=_dec(tq),
    )
    return StoredCandle(candle, source, bool(complete))  # type: ignore[arg-type]


def _row(c: Candle, source: Source, complete: bool) -> Row:
    return (
        c.candle_time,
        c.open,
        c.high,
        c.low,
        c.close,
        c.volume,
        c.quote_volume,
        c.trades,
        c.taker_buy_base,
        c.taker_buy_quote,
        source,
        complete,
    )


@final
class PgStoreTxn:
    """The store inside one write transaction (a worker thread), as SQLite's ``StoreTxn``."""

    def __init__(
        self,
        conn: Conn,
        sequence: int = 0,
        *,
        meta: dict[str, str] | None = None,
        last_event_id: int | None = None,
    ) -> None:
        """``meta``: the whole meta table as this transaction sees it (the store keeps it
        between its transactions while nobody else writes): read from and written through;
        None: read from the table. ``last_event_id``: the event counter as read under the
        write lock: event ids are then handed out without a read; None: each read."""
        self._conn = conn
        self._sequence = sequence
        self._meta = meta
        self._last_event_id = last_event_id
        # events and meta records held back: one statement each at :meth:`flush`, not one
        # per row (a timeframe's first bars make an event and a meta record per series)
        self._events: list[tuple[int, str, str, str, float]] = []
        self._meta_writes: dict[str, str] = {}

    @property
    def sequence(self) -> int:
        """This write transaction's number (see the SQLite ``StoreTxn.sequence``): taken
        from the database's ``write_counter`` under the write lock, so it is one more than
        the previous write transaction of any process, and a process that sees its own last
        number plus one knows that nobody else wrote in between."""
        return self._sequence

    @property
    def last_event_id(self) -> int | None:
        """The event counter as this transaction leaves it (None: not read)."""
        return self._last_event_id

    def write_rows(self, rows: Sequence[tuple[str, StoredCandle]]) -> None:
        """Insert or replace ``(series_id, row)`` pairs exactly as given (a later pair for
        the same key wins), in one statement."""
        if not rows:
            return
        latest: dict[tuple[str, int], tuple[object, ...]] = {}
        for series_id, row in rows:
            key = (series_id, row.candle.candle_time)
            latest[key] = (series_id, *_row(row.candle, row.source, row.complete))
        self._conn.execute(_UPSERT_ROWS, _columns(latest.values()))

    def first_time(self, series_id: str) -> int | None:
        """The oldest stored ``candle_time`` of the series (None: nothing stored)."""
        row = self._conn.execute(
            "SELECT MIN(candle_time) FROM candles WHERE series_id = %s", (series_id,)
        ).fetchone()
        return None if row is None or row[0] is None else int(str(row[0]))

    def upsert(
        self,
        series_id: str,
        candles: Sequence[Candle],
        source: Source,
        *,
        complete: bool = True,
    ) -> list[UpsertOutcome]:
        """Insert or update ``candles``; per candle, was it new, unchanged or revised?

        Values are compared numerically, so ``1.0`` and ``1.00`` are the same price. An
        unchanged candle keeps its stored text and source, but gains extras it lacked and
        the newer ``complete`` mark.
        """
        if not candles:
            return []
        # rows as (candle_time, open … taker_buy_quote, source, complete): compared without
        # building a Candle for each stored row (the cost that dominates an upsert here)
        if len(candles) == 1:
            # the derivation's case: one statement inserts it unless a row is there already
            # (then it returns that row), one round trip instead of a SELECT and an INSERT
            new = _row(candles[0], source, complete)
            stored = self._conn.execute(_INSERT_IF_ABSENT, (series_id, *new)).fetchone()
            if stored is None:
                return [UpsertOutcome.NEW]
            existing = {new[0]: stored}
        else:
            times = sorted({c.candle_time for c in candles})
            existing = {int(str(row[0])): row for row in self._stored_at(series_id, times)}
        inserts: dict[int, Row] = {}
        updates: dict[int, Row] = {}
        outcomes: list[UpsertOutcome] = []
        for candle in candles:
            t = candle.candle_time
            new = _row(candle, source, complete)
            old = existing.get(t)
            if old is None:
                write: Row | None = new
                outcomes.append(UpsertOutcome.NEW)
            elif not _same_values(old, new):
                write = new
                outcomes.append(UpsertOutcome.REVISED)
            else:
                write = None
                if old[11] != complete or _gains_extras(old, new):
                    write = (*old[:6], *_merged_extras(old, new), old[10], complete)
                outcomes.append(UpsertOutcome.UNCHANGED)
            if write is not None:
                # a time first seen in this batch stays an insert, with its latest values
                (updates if old is not None and t not in inserts else inserts)[t] = write
            existing[t] = new
        self._insert(series_id, inserts.values())
        if updates:
            self._conn.execute(_UPSERT_ROWS, _columns((series_id, *r) for r in updates.values()))
        return outcomes

    def _stored_at(self, series_id: str, times: list[int]) -> list[Row]:
        """The stored rows at ``times`` (ascending, distinct)."""
        if (times[-1] - times[0]) // MINUTE < 2 * len(times):
            # dense (a live batch, one derived candle): one index range scan, cheapest
            rows = self._conn.execute(
                f"SELECT {COLUMNS} FROM candles WHERE series_id = %s"  # noqa: S608
                " AND candle_time >= %s AND candle_time <= %s",
                (series_id, times[0], times[-1]),
            ).fetchall()
            wanted = set(times)
            return [row for row in rows if row[0] in wanted]
        # sparse: a join with the times, not ``= ANY(…)``: the planner probes the primary
        # key once per time instead of testing stored rows against the whole array
        cur = self._conn.execute(
            f"SELECT {_PREFIXED} FROM unnest(%s::bigint[]) AS t(candle_time)"  # noqa: S608
            " JOIN candles c ON c.series_id = %s AND c.candle_time = t.candle_time",
            (times, series_id),
        )
        return cur.fetchall()

    def _insert(self, series_id: str, rows: Iterable[Row]) -> None:
        rows = [(series_id, *row) for row in rows]
        if rows:
            self._conn.execute(_INSERT_ROWS, _columns(rows))

    def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        """Stored candles with ``start <= candle_time < end``, ascending."""
        return select_candles(
            self._conn,
            "candle_time >= %s AND candle_time < %s ORDER BY candle_time",
            (series_id, start, end),
        )

    def last_before(self, series_id: str, t: int) -> StoredCandle | None:
        rows = select_candles(
            self._conn, "candle_time < %s ORDER BY candle_time DESC LIMIT 1", (series_id, t)
        )
        return rows[0] if rows else None

    def head_time(self, series_id: str) -> int | None:
        return head_time(self._conn, series_id)

    def heads_of(self, series_ids: Collection[str]) -> dict[str, int]:
        """The head of each of ``series_ids`` with a stored row, in one query."""
        cur = self._conn.execute(_HEADS_OF, (_text_array(series_ids),))
        return {str(sid): int(str(t)) for sid, t in cur if t is not None}

    def append_event(
        self, series_id: str, event: str, data: Mapping[str, object], created_at: float
    ) -> int:
        """Add an entry to the event log; its ``event_id`` (above every id ever given)."""
        data_text = orjson.dumps(dict(data)).decode()
        if self._last_event_id is not None:
            # the counter was read under the write lock: the id is known, nothing to wait for
            event_id = self._last_event_id = self._last_event_id + 1
            self._events.append((event_id, series_id, event, data_text, created_at))
            return event_id
        self.flush()
        row = self._conn.execute(
            "WITH next AS (UPDATE event_counter SET last_id = last_id + 1 RETURNING last_id)"
            " INSERT INTO events (event_id, series_id, event, data, created_at)"
            " SELECT last_id, %s, %s, %s, %s FROM next RETURNING event_id",
            (series_id, event, data_text, created_at),
        ).fetchone()
        assert row is not None
        return int(str(row[0]))

    def import_event(self, event: StoredEvent) -> bool | None:
        """Store ``event`` under its own id (moving a log from another store): True; False
        when the same event is there already; None when that id holds another event (the
        log has entries of its own: nothing is written). Later ids given by
        :meth:`append_event` stay above it."""
        self.flush()
        cur = self._conn.execute(
            "INSERT INTO events (event_id, series_id, event, data, created_at)"
            " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (event_id) DO NOTHING RETURNING event_id",
            (
                event.event_id,
                event.series_id,
                event.event,
                orjson.dumps(event.data).decode(),
                event.created_at,
            ),
        )
        inserted = cur.fetchone() is not None
        if not inserted:
            row = self._conn.execute(
                "SELECT series_id, event, data FROM events WHERE event_id = %s",
                (event.event_id,),
            ).fetchone()
            stored = None if row is None else (str(row[0]), str(row[1]), orjson.loads(str(row[2])))
            if stored != (event.series_id, event.event, dict(event.data)):
                return None
        self._conn.execute(
            "UPDATE event_counter SET last_id = GREATEST(last_id, %s)", (event.event_id,)
        )
        if self._last_event_id is not None:
            self._last_event_id = max(self._last_event_id, event.event_id)
        return inserted

    def prune_events(self, keep: int, created_after: float) -> int:
        """Drop events beyond the newest ``keep`` or created before ``created_after``; return
        the highest event_id ever pruned (kept in meta: cursors at or below it are older than
        the retention)."""
        self.flush()
        row = self._conn.execute(
            "SELECT COALESCE(MAX(event_id), 0) FROM events"
            " WHERE event_id <= (SELECT COALESCE(MAX(event_id), 0) FROM events) - %s"
            " OR created_at < %s",
            (keep, created_after),
        ).fetchone()
        upto = 0 if row is None else int(str(row[0]))
        previous = int(self.get_meta(EVENTS_PRUNED_KEY) or 0)
        if upto > previous:
            self._conn.execute("DELETE FROM events WHERE event_id <= %s", (upto,))
            self.set_meta(EVENTS_PRUNED_KEY, str(upto))
            return upto
        return previous

    def get_meta(self, key: str) -> str | None:
        if self._meta is not None:
            return self._meta.get(key)
        if key in self._meta_writes:
            return self._meta_writes[key]
        return get_meta(self._conn, key)

    def delete_meta(self, key: str) -> None:
        if self._meta is not None:
            self._meta.pop(key, None)
        self._meta_writes.pop(key, None)
        self._conn.execute("DELETE FROM meta WHERE key = %s", (key,))

    def set_meta(self, key: str, value: str) -> None:
        if self._meta is not None:
            self._meta[key] = value
        self._meta_writes[key] = value

    def flush(self) -> None:
        """Send the events and meta records held back (the store calls it before COMMIT;
        a method that reads the same tables first)."""
        if self._events:
            columns, self._events = [list(c) for c in zip(*self._events, strict=True)], []
            self._conn.execute(
                "WITH counter AS (UPDATE event_counter SET last_id = %s)"
                " INSERT INTO events (event_id, series_id, event, data, created_at) SELECT *"
                " FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::text[], %s::float8[])",
                (self._last_event_id, *columns),
            )
        if self._meta_writes:
            keys, values = list(self._meta_writes), list(self._meta_writes.values())
            self._meta_writes = {}
            self._conn.execute(
                "INSERT INTO meta (key, value) SELECT * FROM unnest(%s::text[], %s::text[])"
                " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (keys, values),
            )


def _columns(rows: Iterable[Row]) -> list[str]:
    """Rows ``(series_id, candle_time, …, source, complete)`` as one array literal per
    column (the parameters of :data:`_INSERT_ROWS`), written here: psycopg's list adapter
    costs about 1 µs per value, ``str`` a tenth of that. A number is its ``str`` (a
    Decimal's keeps its exponent: the scale stored is the scale received, as psycopg's own
    adapter gives it); the texts are quoted."""
    columns = list(zip(*rows, strict=True))
    return [
        _text_array(columns[0]),
        *(_number_array(column) for column in columns[1:11]),
        _text_array(columns[11]),
        "{" + ",".join("t" if v else "f" for v in columns[12]) + "}",
    ]


def _number_array(values: Iterable[object]) -> str:
    return "{" + ",".join("NULL" if v is None else str(v) for v in values) + "}"


def _text_array(values: Iterable[object]) -> str:
    return (
        "{"
        + ",".join('"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
        + "}"
    )


def _same_values(old: Row, new: Row) -> bool:
    """``Candle.same_values`` on rows: OHLCV numerically equal, and every extra both know."""
    if old[1:6] != new[1:6]:
        return False
    return all(a is None or b is None or a == b for a, b in zip(old[6:10], new[6:10], strict=True))


def _gains_extras(old: Row, new: Row) -> bool:
    return any(a is None and b is not None for a, b in zip(old[6:10], new[6:10], strict=True))


def _merged_extras(old: Row, new: Row) -> Row:
    return tuple(b if a is None else a for a, b in zip(old[6:10], new[6:10], strict=True))


def select_candles(conn: Conn, where: str, params: tuple[object, ...]) -> list[StoredCandle]:
    cur = conn.execute(
        f"SELECT {COLUMNS} FROM candles WHERE series_id = %s AND {where}",  # noqa: S608
        params,
    )
    return [row_to_stored(row) for row in cur.fetchall()]


def head_time(conn: Conn, series_id: str) -> int | None:
    row = conn.execute(
        "SELECT MAX(candle_time) FROM candles WHERE series_id = %s", (series_id,)
    ).fetchone()
    return None if row is None or row[0] is None else int(str(row[0]))


def get_meta(conn: Conn, key: str) -> str | None:
    row = conn.execute("SELECT value FROM meta WHERE key = %s", (key,)).fetchone()
    return None if row is None else str(row[0])


def select_events(
    conn: Conn, after: int, series_ids: Sequence[str] | None, limit: int
) -> list[StoredEvent]:
    """Events with ``event_id > after`` (of ``series_ids`` when given), ascending."""
    if series_ids is None:
        cur = conn.execute(
            "SELECT event_id, series_id, event, data, created_at FROM events"
            " WHERE event_id > %s ORDER BY event_id LIMIT %s",
            (after, limit),
        )
    else:
        cur = conn.execute(
            "SELECT event_id, series_id, event, data, created_at FROM events"
            " WHERE event_id > %s AND series_id = ANY(%s) ORDER BY event_id LIMIT %s",
            (after, list(series_ids), limit),
        )
    return [
        StoredEvent(int(str(i)), str(s), str(e), orjson.loads(str(d)), float(str(c)))
        for i, s, e, d, c in cur
    ]


def events_newest_id(conn: Conn) -> int:
    row = conn.execute("SELECT last_id FROM event_counter").fetchone()
    return 0 if row is None else int(str(row[0]))


def events_pruned_upto(conn: Conn) -> int:
    text = get_meta(conn, EVENTS_PRUNED_KEY)
    return 0 if text is None else int(text)
