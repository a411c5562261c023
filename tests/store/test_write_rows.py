"""StoreTxn.write_rows in multi-row statements: every size, order and repeat as given."""

from __future__ import annotations

from pathlib import Path

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
