"""The synchronous view of the SQLite store inside one write transaction (a worker thread),
and the row conversions the readers share. Raises sqlite3 errors; the store translates them."""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Final, final

import attrs
import orjson

from tradecanvas.model import Candle
from tradecanvas.store.types import Source, StoredCandle, StoredEvent, UpsertOutcome

# meta key: the highest event_id the retention has pruned
EVENTS_PRUNED_KEY: Final = "events_pruned_upto"
_COLUMNS: Final = (
    "candle_time, open, high, low, close, volume, quote_volume, trades,"
    " taker_buy_base, taker_buy_quote, source, complete"
)


def _text(value: Decimal | None) -> str | None:
    return None if value is None else format(value, "f")


def _dec(text: str | None) -> Decimal | None:
    return None if text is None else Decimal(text)


def _row_to_stored(row: tuple[object, ...]) -> StoredCandle:
    (t, o, h, lo, c, v, q, n, tb, tq, source, complete) = row
    candle = Candle(
        candle_time=int(t),  # type: ignore[call-overload]
        open=Decimal(str(o)),
        high=Decimal(str(h)),
        low=Decimal(str(lo)),
        close=Decimal(str(c)),
        volume=Decimal(str(v)),
        quote_volume=_dec(q),  # type: ignore[arg-type]
        trades=n,  # type: ignore[arg-type]
        taker_buy_base=_dec(tb),  # type: ignore[arg-type]
        taker_buy_quote=_dec(tq),  # type: ignore[arg-type]
    )
    return StoredCandle(candle, source, bool(complete))  # type: ignore[arg-type]


@final
class StoreTxn:
    """The synchronous view of the store inside one write transaction (a worker thread)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

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
        times = [c.candle_time for c in candles]
        existing = {
            s.candle.candle_time: s for s in self.range(series_id, min(times), max(times) + 1)
        }
        outcomes: list[UpsertOutcome] = []
        for candle in candles:
            old = existing.get(candle.candle_time)
            if old is None:
                self._write(series_id, candle, source, complete, replace=False)
                outcomes.append(UpsertOutcome.NEW)
            elif not old.candle.same_values(candle):
                self._write(series_id, candle, source, complete, replace=True)
                outcomes.append(UpsertOutcome.REVISED)
            else:
                if old.complete != complete or _gains_extras(old.candle, candle):
                    merged = _merge_extras(old.candle, candle)
                    self._write(series_id, merged, old.source, complete, replace=True)
                outcomes.append(UpsertOutcome.UNCHANGED)
            existing[candle.candle_time] = StoredCandle(candle, source, complete)
        return outcomes

    def _write(
        self, series_id: str, c: Candle, source: Source, complete: bool, *, replace: bool
    ) -> None:
        verb = "INSERT OR REPLACE" if replace else "INSERT"
        self._conn.execute(
            f"{verb} INTO candles (series_id, {_COLUMNS})"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                series_id,
                c.candle_time,
                _text(c.open),
                _text(c.high),
                _text(c.low),
                _text(c.close),
                _text(c.volume),
                _text(c.quote_volume),
                c.trades,
                _text(c.taker_buy_base),
                _text(c.taker_buy_quote),
                source,
                int(complete),
            ),
        )

    def range(self, series_id: str, start: int, end: int) -> list[StoredCandle]:
        """Stored candles with ``start <= candle_time < end``, ascending."""
        return select_candles(
            self._conn,
            "candle_time >= ? AND candle_time < ? ORDER BY candle_time",
            (series_id, start, end),
        )

    def last_before(self, series_id: str, t: int) -> StoredCandle | None:
        rows = select_candles(
            self._conn, "candle_time < ? ORDER BY candle_time DESC LIMIT 1", (series_id, t)
        )
        return rows[0] if rows else None

    def head_time(self, series_id: str) -> int | None:
        return head_time(self._conn, series_id)

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


def _gains_extras(old: Candle, new: Candle) -> bool:
    return any(
        getattr(old, name) is None and getattr(new, name) is not None
        for name in ("quote_volume", "trades", "taker_buy_base", "taker_buy_quote")
    )


def _merge_extras(old: Candle, new: Candle) -> Candle:
    return attrs.evolve(
        old,
        quote_volume=old.quote_volume if old.quote_volume is not None else new.quote_volume,
        trades=old.trades if old.trades is not None else new.trades,
        taker_buy_base=old.taker_buy_base if old.taker_buy_base is not None else new.taker_buy_base,
        taker_buy_quote=old.taker_buy_quote
        if old.taker_buy_quote is not None
        else new.taker_buy_quote,
    )


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
