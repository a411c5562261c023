"""StoreTxn.write_rows in multi-row statements: every size, order and repeat as given."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import attrs
import pytest

from tests.conftest import candle, flat_minutes
from tradecanvas.store.sqlite import CandleStore, StoredCandle
from tradecanvas.store.txn import ROWS_PER_STATEMENT

SID = "binance:futures:BTC/USDT:1m"
OTHER = "binance:spot:ETH/USDT:1m"


@pytest.mark.parametrize("count", [1, 2, 3, ROWS_PER_STATEMENT - 1, ROWS_PER_STATEMENT, 700])
async def test_every_row_is_written_whatever_the_count(tmp_path: Path, count: int) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    rows = [StoredCandle(c, "rest", i % 3 != 0) for i, c in enumerate(flat_minutes(0, count))]
    # two series interleaved in one call
    pairs = [(SID if i % 2 else OTHER, r) for i, r in enumerate(rows)]
    await store.write(lambda txn: txn.write_rows(pairs))
    assert await store.range(SID, 0, 60 * count) == rows[1::2]
    assert await store.range(OTHER, 0, 60 * count) == rows[0::2]
    await store.aclose()


async def test_a_later_pair_for_the_same_key_wins_inside_one_statement(tmp_path: Path) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    first = StoredCandle(candle(60, "1", "2", "1", "2"), "rest", False)
    second = StoredCandle(candle(60, "3", "4", "3", "4"), "ws", True)
    filler = [StoredCandle(c, "rest", True) for c in flat_minutes(120, 10)]
    await store.write(
        lambda txn: txn.write_rows([(SID, first), *((SID, f) for f in filler), (SID, second)])
    )
    assert await store.range(SID, 60, 61) == [second]
    await store.aclose()


def _dump(path: Path) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("SELECT * FROM candles ORDER BY series_id, candle_time").fetchall()
    finally:
        conn.close()


async def test_rows_without_extras_are_stored_as_by_the_statement_of_every_column(
    tmp_path: Path,
) -> None:
    """Rows without extras go in a statement that leaves those columns out (NULL, their
    default); runs of either kind keep the order given: the store holds exactly what the
    statement of every column makes of the same pairs, a later pair for a key still wins
    (with extras over without and the other way round) and exponents are written plain."""
    with_extras = [
        StoredCandle(attrs.evolve(c, quote_volume=Decimal("1E+3"), trades=7), "ws", True)
        for c in flat_minutes(0, 5)
    ]
    without = [StoredCandle(c, "rest", i % 2 == 0) for i, c in enumerate(flat_minutes(0, 300))]
    exponent = StoredCandle(candle(600, "1E+2", "1E+2", "1E+2", "1E+2"), "http", True)
    pairs = [
        *((SID, r) for r in without),
        *((SID, r) for r in with_extras),  # replaces rows written without extras
        (OTHER, exponent),
        *((OTHER, r) for r in with_extras),
        *((OTHER, r) for r in without[:3]),  # replaces rows written with extras
    ]
    stores = []
    for name, write in (
        ("kinds", lambda txn: txn.write_rows(pairs)),
        ("every", lambda txn: txn._write_run(pairs, extras=True)),
    ):
        path = tmp_path / f"{name}.sqlite3"
        store = await CandleStore.open(path)
        await store.write(write)
        await store.aclose()
        stores.append(_dump(path))
    assert stores[0] == stores[1]
    by_key = {(r[0], r[1]): r for r in stores[0]}
    assert by_key[(SID, 0)][7:11] == ("1000", 7, None, None)
    assert by_key[(OTHER, 0)][7:11] == (None, None, None, None)
    assert by_key[(OTHER, 600)][2:7] == ("100", "100", "100", "100", "1")
    assert len(stores[0]) == 300 + 6
