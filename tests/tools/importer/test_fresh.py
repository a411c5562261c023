"""The import's short way (``tools/importer/fresh.py``) against the pipeline's commit step:
for any history, transaction sizes and derived timeframes, the same rows (their text, source
and mark), events, meta entries and counts as ``BatchCommit`` — and the switch back to it
(a file below what is stored, a store that holds the series) keeps them the same."""

from __future__ import annotations

import functools
import random
import sqlite3
import tempfile
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.tools.importer.rig import Nobody
from tradecanvas.model import MINUTE, Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.store.open import open_store
from tradecanvas.tools.importer.commit import ArchiveCommitter
from tradecanvas.tools.importer.fresh import Written
from tradecanvas.wire.kline_columns import KlineColumns

SERIES = SeriesId.parse("binance:spot:BTC/USDT:1m")
MONDAY = 1_704_067_200  # 2024-01-01 00:00 UTC, a Monday and a month's first day
LEVELS = (
    ("5m", "15m", "1h", "4h", "1d"),
    ("5m", "1h", "1d", "3d", "1w", "1M"),
    ("15m", "1d", "1w"),
)
# text forms: scales that differ, zeros str writes with an exponent, tiny amounts
PRICES = ("1.5", "1.50", "2", "0.00000010", "3.25000000", "10")
VOLUMES = ("0", "0.00000000", "0.5", "1.25000000", "0.00000010", "7")

minute_runs = st.lists(
    st.tuples(
        st.one_of(st.integers(0, 7), st.integers(0, 6000)),  # minutes skipped before the run
        st.integers(1, 400),  # minutes in the run
    ),
    min_size=1,
    max_size=5,
)


@st.composite
def histories(draw: st.DrawFn) -> list[Candle]:
    start = MONDAY + MINUTE * draw(st.integers(0, 3 * 1440))
    times: list[int] = []
    t = start
    for skipped, length in draw(minute_runs):
        t += skipped * MINUTE
        times += range(t, t + length * MINUTE, MINUTE)
        t += length * MINUTE
    # the values drawn by a seeded generator (a list drawn a minute is slow to shrink)
    pick = random.Random(draw(st.integers(0, 2**32))).choice
    volumes = draw(st.lists(st.sampled_from(VOLUMES), min_size=1, max_size=4))
    candles = []
    for i, t in enumerate(times):
        o, c, a, b = (Decimal(pick(PRICES)) for _ in range(4))
        lo, h = min(o, c, a), max(o, c, b)
        v = Decimal(pick(volumes))
        candles.append(Candle(t, o, h, lo, c, v, v * 2, i % 5, v / 2, Decimal(pick(VOLUMES))))
    return candles


def _dump(db: Path) -> tuple[list[tuple[object, ...]], ...]:
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute("SELECT * FROM candles ORDER BY series_id, candle_time").fetchall()
        events = conn.execute("SELECT * FROM events ORDER BY event_id").fetchall()
        meta = conn.execute("SELECT * FROM meta ORDER BY key").fetchall()
        return rows, events, meta
    finally:
        conn.close()


def _totals(written: Sequence[Written]) -> dict[str, tuple[int, int, int, int]]:
    totals: dict[str, tuple[int, int, int, int]] = {}
    for w in written:
        rows, revised, first, last = totals.get(w.series_id, (0, 0, w.first, w.last))
        totals[w.series_id] = (rows + w.rows, revised + w.revised, min(first, w.first),
                               max(last, w.last))  # fmt: skip
    return totals


async def _import(
    db: Path,
    derived: Sequence[str],
    phase: int | None,
    chunks: Sequence[Sequence[Candle]],
    by_column: bool,
) -> dict[str, tuple[int, int, int, int]]:
    store = await open_store(db)
    try:
        pipeline = IngestPipeline(
            store, Nobody(), [Timeframe.parse(t) for t in derived], "test-fingerprint"
        )
        if phase is not None:
            pipeline.set_phase(SERIES, phase)
        committer = ArchiveCommitter(pipeline, clock=lambda: 1.0)
        written: list[Written] = []
        for chunk in chunks:
            given_ = KlineColumns.of_candles(chunk) if by_column else list(chunk)
            done = await committer.commit(SERIES, given_, checked=True)
            written += done.updates
        await committer.finish()
        return _totals(written)
    finally:
        await store.aclose()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    histories(),
    st.sampled_from(LEVELS),
    st.one_of(st.none(), st.integers(0, 2).map(lambda d: d * 86_400)),
    st.integers(1, 900),
    st.sampled_from(["none", "again", "stored"]),
)
def test_the_short_way_stores_what_the_pipeline_commit_stores(
    candles: list[Candle],
    derived: tuple[str, ...],
    phase: int | None,
    batch: int,
    then: str,
) -> None:
    """Chunks of ``batch`` minutes, by column (the short way while it can) and as candles
    (always the pipeline's ``BatchCommit``): the same store and the same counts. ``again``:
    the first chunk once more at the end (below the head: back to the pipeline's way);
    ``stored``: the first chunk stored before the import (the short way never taken)."""
    chunks = [candles[i : i + batch] for i in range(0, len(candles), batch)]
    if then == "again":
        chunks.append(chunks[0])
    results = []
    with tempfile.TemporaryDirectory() as d:
        for by_column in (True, False):
            db = Path(d) / f"{by_column}.sqlite3"
            if then == "stored":
                trio.run(_import, db, derived, phase, chunks[:1], False)
            totals = trio.run(_import, db, derived, phase, chunks, by_column)
            results.append((totals, _dump(db)))
    assert results[0] == results[1]


def test_a_fresh_series_goes_the_short_way_and_a_stored_one_does_not() -> None:
    """The short way is taken for a series with nothing stored, and not once the import
    finds rows of it, nor after another transaction than its own wrote to the store."""
    minutes = [
        Candle(MONDAY + MINUTE * i, Decimal(1), Decimal(2), Decimal(1), Decimal(2), Decimal(1))
        for i in range(30)
    ]
    full = KlineColumns.of_candles(minutes)
    assert not full.all_known()
    one = Decimal(1)
    known = [attrs.evolve(c, quote_volume=one, trades=1, taker_buy_base=one, taker_buy_quote=one)
             for c in minutes]  # fmt: skip

    async def run(db: Path, *, between: bool = False) -> list[bool]:
        store = await open_store(db)
        try:
            committer = ArchiveCommitter(
                IngestPipeline(store, Nobody(), [Timeframe.parse("5m")], "f")
            )
            taken = []
            for part in (known[:10], known[10:20], known[20:]):
                await committer.commit(SERIES, KlineColumns.of_candles(part), checked=True)
                taken.append(committer._fresh.get(str(SERIES)) is not None)
                if between:  # another writer: the short way no longer knows the store
                    await store.set_meta("elsewhere", "1")
            return taken
        finally:
            await store.aclose()

    with tempfile.TemporaryDirectory() as d:
        db = Path(d) / "s.sqlite3"
        assert trio.run(run, db) == [True, True, True]
        assert trio.run(run, db) == [False, False, False]  # now it holds them
        other = Path(d) / "other.sqlite3"
        assert trio.run(functools.partial(run, other, between=True)) == [True, False, False]
