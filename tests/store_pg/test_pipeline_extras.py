"""tests/pipeline/test_extras.py on PostgreSQL: a minute that gains Binance's extras (same
values) has its derived bars derived again, quietly — the same path (BatchCommit over the
backend's WriteTxn) and the same rows as on SQLite."""

from __future__ import annotations

from pathlib import Path

from tests.pipeline.test_extras import extras_arrive_later
from tradecanvas.store.open import open_store


async def test_derived_bars_gain_the_extras_their_minutes_gained(
    pg_url: str, data_dir: Path
) -> None:
    await extras_arrive_later(await open_store(pg_url), data_dir)
