"""RecentBars answers exactly what the store holds, whatever mix of reads, writes (above the
known head too, as a live minute's) and trims came before (hypothesis against real SQLite),
and reads only what it does not know."""

from __future__ import annotations

import itertools
import sqlite3
from collections.abc import Collection
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from tradecanvas.model import Candle
from tradecanvas.pipeline.recent import MAX_ROWS_PER_SERIES, RecentBars, _Known
from tradecanvas.store.schema import migrate
from tradecanvas.store.txn import StoreTxn
from tradecanvas.store.types import StoredCandle

SID = "binance:spot:ETH/USDT:1m"


def _txn() -> StoreTxn:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    return StoreTxn(conn)


def row(t: int, price: int = 1) -> StoredCandle:
    p = Decimal(price)
    return StoredCandle(Candle(t, p, p, p, p, Decimal(1)), "ws", True)


times = st.integers(0, 40).map(lambda i: i * 60)
ops = st.one_of(
    st.tuples(st.just("write"), st.lists(times, max_size=5), st.integers(1, 3)),
    st.tuples(st.just("range"), times, st.integers(0, 900)),
    st.tuples(st.just("before"), times, st.just(0)),
    st.tuples(st.just("head"), st.just(0), st.just(0)),
    st.tuples(st.just("trim"), times, st.just(0)),
    st.tuples(st.just("above"), st.just(0), st.integers(1, 3)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(times, st.integers(1, 3)), max_size=12), st.lists(ops, max_size=25))
def test_answers_equal_the_store(
    initial: list[tuple[int, int]], script: list[tuple[str, object, int]]
) -> None:
    txn = _txn()
    txn.write_rows([(SID, row(t, p)) for t, p in dict(initial).items()])
    recent = RecentBars()
    for op, arg, n in script:
        if op == "write":
            assert isinstance(arg, list)
            # as the pipeline does: know a time (read it) before writing it
            for t in sorted(set(arg)):
                recent.range(txn, SID, t, t + 1)
            recent.head(txn, SID)
            rows = [row(t, n) for t in sorted(set(arg))]
            txn.write_rows([(SID, r) for r in rows])
            recent.wrote(SID, rows)
        elif op == "range":
            assert isinstance(arg, int)
            assert recent.range(txn, SID, arg, arg + n) == txn.range(SID, arg, arg + n)
        elif op == "before":
            assert isinstance(arg, int)
            assert recent.last_before(txn, SID, arg) == txn.last_before(SID, arg)
        elif op == "head":
            assert recent.head(txn, SID) == txn.head_time(SID)
        elif op == "above":
            # as the live minute's short way does: one row above the known head
            head = recent.head(txn, SID)
            if head is not None:
                above = row(head + 60 * n, n)
                txn.write_rows([(SID, above)])
                recent.wrote_above_head(SID, above)
                # known without a read: nothing between the old head and the row
                assert recent.known_range(SID, head + 1, head + 60 * n + 1) == [above]
        else:
            assert isinstance(arg, int)
            recent.trim(SID, arg)
            assert all(t >= arg for t in recent.cached_rows(SID))


def test_reads_only_the_gaps_and_nothing_above_a_known_head() -> None:
    txn = _txn()
    txn.write_rows([(SID, row(t)) for t in range(0, 600, 60)])
    recent = RecentBars()
    assert recent.head(txn, SID) == 540
    assert len(recent.range(txn, SID, 120, 300)) == 3
    reads = recent.reads
    assert len(recent.range(txn, SID, 180, 10_000)) == 7  # only [300, 541) is read
    assert recent.reads == reads + 1
    assert len(recent.range(txn, SID, 120, 20_000)) == 8  # all known now
    assert recent.last_before(txn, SID, 150) == row(120)
    assert recent.reads == reads + 1
    recent.wrote(SID, [row(600)])  # the new head: known without a read
    assert recent.head(txn, SID) == 600
    assert recent.range(txn, SID, 541, 700) == [row(600)]
    assert recent.reads == reads + 1


def test_trim_keeps_a_bounded_tail_and_begin_forgets_after_a_gap_in_sequence() -> None:
    txn = _txn()
    recent = RecentBars()
    recent.begin(1)
    assert recent.head(txn, SID) is None
    rows = [row(60 * i) for i in range(MAX_ROWS_PER_SERIES + 10)]
    txn.write_rows([(SID, r) for r in rows])
    recent.wrote(SID, rows)
    recent.trim(SID, 0)
    assert len(recent.cached_rows(SID)) == MAX_ROWS_PER_SERIES
    recent.begin(2)  # the next transaction of the same caller: still known
    assert len(recent.cached_rows(SID)) == MAX_ROWS_PER_SERIES
    recent.begin(4)  # someone else wrote in between (sequence 3)
    assert recent.cached_rows(SID) == ()


class _CountingHeads:
    """StoreTxn's reads, counting the heads_of reads and the ids they named."""

    def __init__(self, txn: StoreTxn) -> None:
        self.txn, self.asked = txn, list[list[str]]()
        self.range, self.last_before, self.head_time = txn.range, txn.last_before, txn.head_time

    def heads_of(self, series_ids: Collection[str]) -> dict[str, int]:
        self.asked.append(sorted(series_ids))
        return self.txn.heads_of(series_ids)


def test_learn_heads_reads_the_heads_not_known_in_one_read() -> None:
    txn = _txn()
    sids = [f"binance:spot:S{i}/USDT:1m" for i in range(5)]
    txn.write_rows([(sid, row(60 * (i + 1))) for i, sid in enumerate(sids[:4])])
    reader = _CountingHeads(txn)
    recent = RecentBars()
    recent.begin(1)
    assert recent.head(reader, sids[0]) == 60 and recent.reads == 1
    recent.learn_heads(reader, sids)
    # one read for the four not known; the fifth is known to have nothing stored
    assert reader.asked == [sids[1:]] and recent.reads == 2
    assert [recent.head(reader, sid) for sid in sids] == [60, 120, 180, 240, None]
    assert recent.range(reader, sids[4], 0, 1000) == []  # nothing above a head of None
    recent.learn_heads(reader, sids)  # all known: no read
    assert recent.reads == 2 and len(reader.asked) == 1
    recent.wrote(sids[4], [row(600)])
    assert recent.head(reader, sids[4]) == 600
    recent.begin(3)  # another writer came between: read again, once
    recent.learn_heads(reader, sids)
    assert reader.asked[-1] == sids and recent.reads == 3
    assert [recent.head(reader, sid) for sid in sids[:2]] == [60, 120]


@given(
    st.lists(times, max_size=8, unique=True),
    st.lists(times, min_size=1, max_size=8, unique=True),
    st.booleans(),
)
def test_wrote_ascending_rows_equals_the_row_by_row_way(
    before: list[int], written: list[int], learn_head: bool
) -> None:
    """wrote's way for ascending rows after all it keeps (a history's batch) leaves what
    the row-by-row way leaves (taken for the same rows in descending order)."""
    txn = _txn()
    txn.write_rows([(SID, row(t)) for t in before])
    states = []
    for order in (sorted, lambda ts: sorted(ts, reverse=True)):
        recent = RecentBars()
        if learn_head:
            recent.head(txn, SID)
        if before:
            recent.range(txn, SID, min(before), max(before) + 1)
        recent.wrote(SID, [row(t, 2) for t in order(written)])
        known = recent._series[SID]
        states.append((known.times, known.rows, known.spans, known.head, known.head_known))
    assert states[0] == states[1]


@given(
    st.lists(st.tuples(st.integers(0, 60), st.integers(0, 60)), max_size=30),
    st.integers(0, 60),
    st.integers(0, 60),
)
def test_spans_hold_exactly_what_was_covered(
    covers: list[tuple[int, int]], start: int, end: int
) -> None:
    """The known spans (found by bisection) against a set of the times covered: ascending,
    disjoint, not touching, and the gaps of any range are the times not covered."""
    known, covered = _Known(), set[int]()
    for lo, hi in covers:
        known.cover(lo, hi)
        covered.update(range(lo, hi))
    spans = known.spans
    assert all(lo < hi for lo, hi in spans)
    assert all(hi < lo for (_, hi), (lo, _) in itertools.pairwise(spans))
    assert {t for lo, hi in spans for t in range(lo, hi)} == covered
    gaps = known.gaps(start, end)
    assert all(lo < hi for lo, hi in gaps)
    assert {t for lo, hi in gaps for t in range(lo, hi)} == set(range(start, end)) - covered
