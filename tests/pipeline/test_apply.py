"""The commit fast path (BatchCommit with RecentBars) equals the reference path
(tests/pipeline/reference.py: the pre-issue-14 algorithm, every read from the store): the
same store contents, updates and events for arbitrary batches — revisions, repeats in a
batch, out-of-order and late minutes, confirmed-absent runs, writes by someone else between
commits — on real SQLite, synchronously."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from decimal import Decimal
from typing import Any

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.pipeline.reference import ReferenceCommit
from tradecanvas.model import DAY, Candle, SeriesId, Timeframe
from tradecanvas.pipeline.apply import BatchCommit
from tradecanvas.pipeline.batch import IngestBatch, SeriesUpdate
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.pipeline.levels import DerivationPlan, Level
from tradecanvas.pipeline.recent import TRIM_EVERY, RecentBars
from tradecanvas.store.schema import migrate
from tradecanvas.store.txn import StoreTxn
from tradecanvas.store.types import Source

T0 = 1_752_019_200  # a day's open (2025-07-09)
BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
ETH = SeriesId.parse("binance:futures:ETH/USDT:1m")
DERIVED = tuple(Timeframe.parse(t) for t in ("5m", "15m", "1h", "1d", "3d"))
GRID_ONLY = DERIVED[:-1]
FIVE_ONLY = DERIVED[:1]


def phase_of(series: SeriesId) -> int | None:
    return DAY if series.symbol == "BTC/USDT" else None  # ETH's 3d grid is unknown


def _connect() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    return conn


def dump(conn: sqlite3.Connection) -> list[tuple[object, ...]]:
    rows = conn.execute("SELECT * FROM candles ORDER BY series_id, candle_time").fetchall()
    meta = conn.execute("SELECT * FROM meta ORDER BY key").fetchall()
    return rows + meta


Outcome = tuple[list[SeriesUpdate], list[SystemEvent], int]


class FastRig:
    """The pipeline's transaction as IngestPipeline runs it, numbered like CandleStore."""

    def __init__(self, derived: tuple[Timeframe, ...] = DERIVED) -> None:
        self.conn = _connect()
        self.recent = RecentBars()
        self.plan = DerivationPlan.of(derived)
        self.checked: set[str] = set()
        self.sequence = 0

    def run(self, batch: IngestBatch) -> Outcome:
        self.sequence += 1
        self.conn.execute("BEGIN IMMEDIATE")
        txn = StoreTxn(self.conn, self.sequence)
        self.recent.begin(txn.sequence)
        work = BatchCommit(txn, self.recent, self.plan, phase_of, "fp", self.checked)
        updates, events, dropped = work.commit(batch)
        work.finish()
        self.conn.execute("COMMIT")
        self.checked.update(u.series_id for u in updates)
        return updates, events, dropped

    def foreign(self, sid: str, candles: list[Candle], source: Source) -> None:
        """A write by another caller of the store: it takes a sequence number."""
        self.sequence += 1
        self.conn.execute("BEGIN IMMEDIATE")
        StoreTxn(self.conn, self.sequence).upsert(sid, candles, source)
        self.conn.execute("COMMIT")


class ReferenceRig:
    def __init__(self, derived: tuple[Timeframe, ...] = DERIVED) -> None:
        self.conn = _connect()
        self.ref = ReferenceCommit(derived, phase_of, "fp")

    def run(self, batch: IngestBatch) -> Outcome:
        self.conn.execute("BEGIN IMMEDIATE")
        outcome = self.ref.run(self.conn, batch)
        self.conn.execute("COMMIT")
        return outcome

    def foreign(self, sid: str, candles: list[Candle], source: Source) -> None:
        self.conn.execute("BEGIN IMMEDIATE")
        StoreTxn(self.conn).upsert(sid, candles, source)
        self.conn.execute("COMMIT")


def minute(index: int, price: int, volume: int, extras: bool, text: int) -> Candle:
    p = Decimal(price)
    written = Decimal(f"{price}.{'0' * text}") if text else p  # same value, other text
    c = Candle(T0 + 60 * index, written, p + 1, p - 1, p, Decimal(volume))
    return with_extras(c) if extras else c


def with_extras(c: Candle) -> Candle:
    """``c`` with the extras :func:`minute` gives (the same values: unchanged, gaining)."""
    return attrs.evolve(c, quote_volume=c.volume * c.close, trades=int(c.volume))


minutes = st.builds(
    minute,
    st.integers(-3, 130),  # a little of the day before, then two hours
    st.integers(100, 102),
    st.sampled_from([0, 0, 1, 2]),
    st.booleans(),
    st.integers(0, 2),
)
symbols = st.sampled_from([BTC, ETH])
# ends of confirmed-absent runs: inside the window, a bucket's end, the day's and 3d's end
ends = st.sampled_from([T0 + 60 * i for i in (5, 15, 60, 90, 131)] + [T0 + DAY, T0 + 2 * DAY])


@st.composite
def batches(draw: st.DrawFn) -> IngestBatch:
    pairs = draw(st.lists(st.tuples(symbols, minutes), max_size=14))
    absent: list[tuple[SeriesId, int, int]] = []
    if draw(st.integers(0, 3)) == 0:
        start = T0 + 60 * draw(st.integers(0, 130))
        absent.append((draw(symbols), start, max(start + 60, draw(ends))))
    source: Source = draw(st.sampled_from(["ws", "rest"]))
    # a listing (right, or wrong: a minute below it stored before or after)
    listed = ((draw(symbols), T0 + 60 * draw(st.integers(-3, 20))),) if draw(st.booleans()) else ()
    return IngestBatch(tuple(pairs), source, absent=tuple(absent), listed=listed)


@st.composite
def scripts(draw: st.DrawFn) -> list[IngestBatch | tuple[str, Candle]]:
    steps: list[IngestBatch | tuple[str, Candle]] = []
    for _ in range(draw(st.integers(1, 7))):
        kind = draw(st.integers(0, 6))
        if kind == 0:
            steps.append((str(draw(symbols)), draw(minutes)))
        elif kind == 1 and steps and isinstance(steps[-1], IngestBatch):
            # the last batch's minutes again, with the extras some lacked (the stream or a
            # repair after the HTTP write path): unchanged, but their bars gain the extras
            again = tuple((s, with_extras(c)) for s, c in steps[-1].candles)
            steps.append(IngestBatch(again, draw(st.sampled_from(["ws", "rest"]))))
        else:
            steps.append(draw(batches()))
    return steps


def run_both(
    script: list[IngestBatch | tuple[str, Candle]], derived: tuple[Timeframe, ...]
) -> Iterator[tuple[Outcome | None, Outcome | None, FastRig, ReferenceRig]]:
    fast, ref = FastRig(derived), ReferenceRig(derived)
    for step in script:
        if isinstance(step, IngestBatch):
            yield fast.run(step), ref.run(step), fast, ref
        else:
            sid, candle = step
            fast.foreign(sid, [candle], "rest")
            ref.foreign(sid, [candle], "rest")
            yield None, None, fast, ref


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scripts(), st.sampled_from([DERIVED, GRID_ONLY, FIVE_ONLY]))
def test_fast_path_equals_the_reference(
    script: list[IngestBatch | tuple[str, Candle]], derived: tuple[Timeframe, ...]
) -> None:
    """With a 3d (a phased grid) every minute takes the long way; without, a live minute
    takes the short one (BatchCommit._live_minute) when it makes no bar due, or only bars
    whose parts RecentBars knows (from 1m, or from the bar this minute made of another)."""
    for got, want, fast, ref in run_both(script, derived):
        assert got == want
        assert dump(fast.conn) == dump(ref.conn)


def test_a_live_minute_reads_nothing_back() -> None:
    """Minute after minute on one series: a minute's commit reads nothing (RecentBars knows
    it all) but, once, the heads of the series and of every series derived from it (one
    read, in the first commit)."""
    fast = FastRig()
    ref = ReferenceRig()
    for i in range(0, 200):
        batch = IngestBatch.of(BTC, [minute(i, 100 + i % 3, i % 3, True, 0)], "ws")
        before = fast.recent.reads
        assert fast.run(batch) == ref.run(batch)
        # the only read: the heads, in the first commit
        assert fast.recent.reads == (1 if i == 0 else before), f"minute {i} read the store"
    assert dump(fast.conn) == dump(ref.conn)
    # what is kept: the current bucket of each timeframe built from a series, and what came
    # since the last trim
    assert len(fast.recent.cached_rows(str(BTC))) <= 5 + TRIM_EVERY


def test_a_due_trim_waits_out_a_minute_that_completes_bars() -> None:
    """The trim due every TRIM_EVERY transactions skips a live minute that completes derived
    bars (the slowest commit): the next transaction trims what both touched. Nothing else
    changes: the rows and updates are the reference's."""
    fast, ref = FastRig(FIVE_ONLY), ReferenceRig(FIVE_ONLY)
    five = str(BTC.with_timeframe(FIVE_ONLY[0]))
    postponed = 0
    for i in range(0, 6 * TRIM_EVERY):
        batch = IngestBatch.of(BTC, [minute(i, 100 + i % 3, 1, True, 0)], "ws")
        waiting = dict(fast.recent.untrimmed)
        assert fast.run(batch) == ref.run(batch)
        if waiting:  # trimmed now, the 5m series with it
            assert fast.recent.untrimmed == {}
            assert len(fast.recent.cached_rows(five)) <= 1
        elif fast.recent.untrimmed:
            postponed += 1
            assert (i + 1) % 5 == 0  # a minute that completes a 5m bar
            assert set(fast.recent.untrimmed) == {str(BTC), five}
    assert postponed >= 1
    assert dump(fast.conn) == dump(ref.conn)


@pytest.mark.parametrize("derived", [FIVE_ONLY, GRID_ONLY])
def test_a_live_minute_that_completes_a_bar_takes_the_short_way(
    derived: tuple[Timeframe, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Live minutes on two series, one of them with a quiet (empty) 5m bucket: a minute that
    completes bars derives them the short way (BatchCommit.derive is not called) — 5m from
    1m, 15m from 5m and 1h from 15m, the first bar of each series too (its ``new_series``
    event) — unless a bucket is all empty (the quiet 5m bar takes the long way)."""
    fast, ref = FastRig(derived), ReferenceRig(derived)
    long_way: list[tuple[str, int]] = []
    derive = BatchCommit.derive

    def spy(self: BatchCommit, base: SeriesId, level: Level, *args: Any, **kw: Any) -> Any:
        long_way.append((base.symbol, level.tf.seconds))
        return derive(self, base, level, *args, **kw)

    monkeypatch.setattr(BatchCommit, "derive", spy)
    for i in range(60):
        quiet = 0 if 20 <= i < 25 else 1
        batch = IngestBatch(
            ((BTC, minute(i, 100 + i % 3, 1, True, 0)), (ETH, minute(i, 100, quiet, False, 0))),
            "ws",
        )
        before = len(long_way)
        assert fast.run(batch) == ref.run(batch)
        if i % 5 == 4:
            want = [("ETH/USDT", 300)] if i == 24 else []
            assert long_way[before:] == want, f"minute {i}"
    assert dump(fast.conn) == dump(ref.conn)


# a live series' minute: traded (most), empty, or missing (a gap the next minutes settle)
live_kinds = st.sampled_from("tttttttte-")


@st.composite
def live_scripts(draw: st.DrawFn) -> list[IngestBatch | tuple[str, Candle]]:
    """Live minutes of two series over two hours and more (5m, 15m and 1h boundaries, the
    day's end), one minute a series a batch, now and then a revision of a recent minute or
    a write by someone else; the first minutes are the series' listing or not."""
    steps: list[IngestBatch | tuple[str, Candle]] = []
    sent: dict[int, Candle] = {}  # BTC's live minutes
    first = draw(st.integers(-20, 10))
    listed = draw(st.booleans())  # the series' first minute is their listing
    for i in range(first, first + draw(st.integers(60, 140))):
        pairs = []
        for symbol in (BTC, ETH):
            kind = draw(live_kinds)
            if kind != "-":
                volume = 0 if kind == "e" else 1 + i % 3
                pairs.append((symbol, minute(i, 100 + i % 4, volume, i % 7 != 0, 0)))
        if pairs:
            listing = tuple((s, c.candle_time) for s, c in pairs) if listed else ()
            listed = False
            steps.append(IngestBatch(tuple(pairs), "ws", listed=listing))
            sent.update((c.candle_time, c) for s, c in pairs if s == BTC)
        aside = draw(st.integers(0, 40))
        if aside == 0:  # a revision (other values: live volumes are 0 to 3)
            steps.append(IngestBatch.of(BTC, [minute(i, 101, 5, True, 0)], "rest"))
        elif aside == 1:
            steps.append((str(ETH), minute(i - 3, 102, 1, False, 0)))
        elif aside == 2:  # a recent minute again with its extras (the last 7k lacked them)
            again = sent.get(T0 + 60 * (i - i % 7 if draw(st.booleans()) else i - 1))
            if again is not None:
                steps.append(IngestBatch.of(BTC, [with_extras(again)], "rest"))
    return steps


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(live_scripts(), st.sampled_from([GRID_ONLY, DERIVED[:3]]))
def test_live_minutes_equal_the_reference(
    script: list[IngestBatch | tuple[str, Candle]], derived: tuple[Timeframe, ...]
) -> None:
    """Runs of live minutes — where the short way makes 15m from 5m and 1h from 15m, or
    falls back to the long way (a gap, an empty bucket, a revision, a foreign write) —
    store the same rows and give the same updates and events as the reference."""
    for got, want, fast, ref in run_both(script, derived):
        assert got == want
        assert dump(fast.conn) == dump(ref.conn)


def test_history_in_batches_reads_nothing_back_and_keeps_little() -> None:
    """A long history committed in batches of 400 (the bulk import's path): no store read
    but the heads (of the series and of every series derived from it, one read), and
    RecentBars holds a few buckets, not the history."""
    fast = FastRig()
    derived = DerivationPlan.of(DERIVED).derived
    count = 3 * 1440
    history = [minute(i, 100 + i % 3, 1 + i % 2, True, 0) for i in range(count)]
    for start in range(0, count, 400):
        fast.run(IngestBatch.of(BTC, history[start : start + 400], "rest"))
    assert fast.recent.reads == 1  # the heads
    assert len(fast.recent.cached_rows(str(BTC))) <= 5
    for tf in derived:
        assert len(fast.recent.cached_rows(str(BTC.with_timeframe(tf)))) <= 31
    stored = fast.conn.execute(
        "SELECT COUNT(*) FROM candles WHERE series_id = ?", (str(BTC.with_timeframe(DERIVED[0])),)
    ).fetchone()[0]
    assert stored == count // 5


@pytest.mark.parametrize("derived", [DERIVED, GRID_ONLY])
def test_a_live_minute_after_an_unfinished_bucket_finalises_it(
    derived: tuple[Timeframe, ...],
) -> None:
    """Minutes 0-2, then 6: the 5m bucket at 0 lacks 3 and 4 and is settled by 6 — stored
    incomplete with a ``gap``, though 6 itself makes no bar due."""
    fast, ref = FastRig(derived), ReferenceRig(derived)
    first = IngestBatch.of(BTC, [minute(i, 100, 1, True, 0) for i in (0, 1, 2)], "ws")
    late = IngestBatch.of(BTC, [minute(6, 100, 1, True, 0)], "ws")
    assert fast.run(first) == ref.run(first)
    got = fast.run(late)
    assert got == ref.run(late)
    events = [(e.series_id, e.event, e.from_time) for e in got[1]]
    assert (str(BTC.with_timeframe(derived[0])), "gap", T0) in events
    assert dump(fast.conn) == dump(ref.conn)
