"""StoreTxn.write_rows in multi-row statements: every size, order and repeat as given."""

from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import attrs
import pytest

from tests.conftest import candle, flat_minutes
from tradecanvas.store.sqlite import CandleStore, StoredCandle
from tradecanvas.store.txn import ROWS_PER_STATEMENT, _row_values
from tradecanvas.store.types import TextedRows

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


def _raw_rows(path: Path) -> list[tuple[object, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute("SELECT * FROM candles ORDER BY series_id, candle_time").fetchall()


async def test_texted_rows_write_a_given_candle_text_and_the_rest_as_before(
    tmp_path: Path,
) -> None:
    """TextedRows: a row holding a candle the map names (by its id) is written with the
    text given, every other row as its Decimals' text; a store written without the map
    holds exactly the same rows when the text given is the Decimals' own."""
    minutes = [
        attrs.evolve(
            c,
            quote_volume=Decimal("1E-7"),  # (str writes it with an exponent, the store not)
            trades=i,
            taker_buy_base=Decimal("0.50"),
            taker_buy_quote=Decimal(12),
        )
        for i, c in enumerate(flat_minutes(0, 300))
    ]
    pairs = [
        (SID if i % 2 else OTHER, StoredCandle(c, "rest", True)) for i, c in enumerate(minutes)
    ]
    # the store's own text of the odd minutes' decimals (and their trade counts)
    values = _row_values(pairs)
    texts = {id(c): tuple(values[13 * i + 2 : 13 * i + 11]) for i, c in enumerate(minutes) if i % 2}
    plain = await CandleStore.open(tmp_path / "plain.sqlite3")
    await plain.write(lambda txn: txn.write_rows(pairs))
    await plain.aclose()
    texted = await CandleStore.open(tmp_path / "texted.sqlite3")
    await texted.write(lambda txn: txn.write_rows(TextedRows(pairs, texts)))  # type: ignore[arg-type]
    await texted.aclose()
    assert _raw_rows(tmp_path / "texted.sqlite3") == _raw_rows(tmp_path / "plain.sqlite3")
    # and the text given is what is written (one candle given another text)
    marked = StoredCandle(minutes[1], "rest", True)
    other = ("9", "9", "9", "9", "9", "9", 9, "9", "9")
    store = await CandleStore.open(tmp_path / "marked.sqlite3")
    await store.write(
        lambda txn: txn.write_rows(TextedRows([(SID, marked)], {id(minutes[1]): other}))
    )
    await store.aclose()
    [row] = _raw_rows(tmp_path / "marked.sqlite3")
    assert row[2:11] == other
