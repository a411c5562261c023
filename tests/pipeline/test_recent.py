"""RecentBars answers exactly what the store holds, whatever mix of reads, writes and trims
came before (hypothesis against real SQLite), and reads only what it does not know."""

from __future__ import annotations

import sqlite3
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from tradecanvas.model import Candle
from tradecanvas.pipeline.recent import MAX_ROWS_PER_SERIES, RecentBars
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


class _AllHeads:
    """StoreTxn's reads plus every series' head in one read (as PostgreSQL's txn gives)."""

    def __init__(self, txn: StoreTxn, conn: sqlite3.Connection) -> None:
        self.txn, self.conn, self.all_heads_reads = txn, conn, 0
        self.range, self.last_before, self.head_time = txn.range, txn.last_before, txn.head_time

    def all_heads(self) -> dict[str, int]:
        self.all_heads_reads += 1
        return dict(self.conn.execute("SELECT series_id, MAX(candle_time) FROM candles GROUP BY 1"))


def test_every_head_comes_from_one_read_when_the_reader_gives_them_all() -> None:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    migrate(conn)
    txn = StoreTxn(conn)
    sids = [f"binance:spot:S{i}/USDT:1m" for i in range(5)]
    txn.write_rows([(sid, row(60 * (i + 1))) for i, sid in enumerate(sids[:4])])
    reader = _AllHeads(txn, conn)
    recent = RecentBars()
    recent.begin(1)
    assert recent.head(reader, sids[2]) == 180
    # the others were named by that read, or are known to have nothing stored (the fifth)
    assert [recent.head(reader, sid) for sid in sids] == [60, 120, 180, 240, None]
    assert recent.range(reader, sids[4], 0, 1000) == []  # nothing above a head of None
    assert recent.reads == 1 and reader.all_heads_reads == 1
    recent.wrote(sids[4], [row(600)])
    assert recent.head(reader, sids[4]) == 600
    recent.begin(3)  # another writer came between: read again, once
    assert recent.head(reader, sids[0]) == 60
    assert recent.head(reader, sids[1]) == 120
    assert recent.reads == 2 and reader.all_heads_reads == 2
