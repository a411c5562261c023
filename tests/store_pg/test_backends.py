"""The store's behaviour, run once per backend (SQLite and PostgreSQL) with the same cases
and expectations: the one store interface answers the same on both."""

from __future__ import annotations

import random
from collections.abc import Callable
from decimal import Decimal

import attrs
import pytest
import trio

from tests.conftest import candle, flat_minutes
from tests.store_pg.conftest import Backend
from tradecanvas.errors import StoreError
from tradecanvas.model import Candle
from tradecanvas.store.interface import WriteTxn
from tradecanvas.store.types import Source, StoredCandle, UpsertOutcome

SID = "binance:futures:BTC/USDT:1m"
NEW, UNCHANGED, REVISED = UpsertOutcome.NEW, UpsertOutcome.UNCHANGED, UpsertOutcome.REVISED


async def test_upsert_is_idempotent_and_detects_revisions(backend: Backend) -> None:
    store = await backend.open()
    first = [candle(60, "1.0", "2", "1", "2"), candle(120, "2", "3", "2", "3")]
    assert await store.upsert(SID, first, "ws") == [NEW, NEW]
    assert await store.upsert(SID, first, "ws") == [UNCHANGED] * 2
    # the same values written differently are the same candle
    assert await store.upsert(SID, [candle(60, "1.00", "2.0", "1", "2.000")], "rest") == [UNCHANGED]
    assert await store.upsert(SID, [candle(120, "2", "3.5", "2", "3")], "rest") == [REVISED]
    stored = await store.range(SID, 0, 1000)
    assert [s.candle.high for s in stored] == [Decimal(2), Decimal("3.5")]
    assert [s.source for s in stored] == ["ws", "rest"]
    assert str(stored[0].candle.open) == "1.0"  # the text first received is kept
    await store.aclose()


async def test_duplicates_within_one_batch(backend: Backend) -> None:
    store = await backend.open()
    c = candle(60, "1", "2", "1", "2")
    revised = candle(60, "1", "9", "1", "2")
    outcomes = await store.upsert(SID, [c, c, revised, candle(120, "1", "1", "1", "1")], "ws")
    assert outcomes == [NEW, UNCHANGED, REVISED, NEW]
    (first, _) = await store.range(SID, 0, 1000)
    assert first.candle.high == Decimal(9)
    assert await store.upsert(SID, [revised, c], "rest") == [UNCHANGED, REVISED]
    (first, _) = await store.range(SID, 0, 1000)
    assert (first.candle.high, first.source) == (Decimal(2), "rest")
    await store.aclose()


async def test_sparse_and_dense_batches(backend: Backend) -> None:
    """A batch of times far apart (a repair here and there) and a dense one (live minutes)
    find what is stored the same way."""
    store = await backend.open()
    far = [candle(60 * k, "1", "1", "1", "1") for k in (0, 10_000, 500_000)]
    assert await store.upsert(SID, far, "rest") == [NEW] * 3
    mixed = [candle(60 * k, "1", "2", "1", "1") for k in (0, 7, 500_000, 500_001)]
    assert await store.upsert(SID, mixed, "rest") == [REVISED, NEW, REVISED, NEW]
    dense = [candle(60 * k, "1", "2", "1", "1") for k in range(499_990, 500_002)]
    assert await store.upsert(SID, dense, "ws") == [NEW] * 10 + [UNCHANGED] * 2
    assert len(await store.range(SID, 0, 60 * 600_000)) == 3 + 1 + 11
    await store.aclose()


async def test_reads_tail_since_before_range_head(backend: Backend) -> None:
    store = await backend.open()
    await store.upsert(SID, list(flat_minutes(0, 10)), "rest")
    assert await store.head_time(SID) == 540
    assert await store.head_time("binance:spot:ETH/USDT:1m") is None
    assert [c.candle_time for c in await store.tail(SID, 3)] == [420, 480, 540]
    assert [c.candle_time for c in await store.since(SID, 120, 2)] == [180, 240]
    assert await store.since(SID, 540, 10) == []
    assert [c.candle_time for c in await store.before(SID, 300, 2)] == [180, 240]
    assert [c.candle_time for c in await store.before(SID, 10**9, 2)] == [480, 540]
    assert await store.before(SID, 0, 10) == []
    assert [s.candle.candle_time for s in await store.range(SID, 60, 180)] == [60, 120]
    # the HTTP read: since (oldest first), before (newest first), both, neither; ascending
    for since, before, limit, times in (
        (120, None, 2, [180, 240]),
        (None, 300, 2, [180, 240]),
        (60, 300, 2, [120, 180]),
        (60, 200, 10, [120, 180]),
        (None, None, 3, [420, 480, 540]),
        (540, None, 5, []),
    ):
        window = await store.window(SID, since, before, limit)
        assert [s.candle.candle_time for s in window] == times, (since, before, limit)
        assert all(s.complete for s in window)
    await store.upsert("x:5m", [candle(0, "1", "2", "1", "2")], "derived", complete=False)
    assert [s.complete for s in await store.window("x:5m", None, None, 5)] == [False]
    heads = await store.heads()
    assert (heads[SID].head_time, heads[SID].first_time, heads[SID].count) == (540, 0, 10)

    def in_txn(txn: WriteTxn) -> tuple[int | None, int | None]:
        before = txn.last_before(SID, 300)
        return (before.candle.candle_time if before else None), txn.head_time(SID)

    assert await store.write(in_txn) == (240, 540)
    await store.aclose()


async def test_reopen_keeps_everything_extras_and_marks(backend: Backend) -> None:
    store = await backend.open()
    c = candle(60, "1", "2", "1", "2")
    await store.upsert(SID, [c], "ws")
    # a later copy with Binance's extras fills them in without being a revision
    rich = attrs.evolve(c, trades=7, quote_volume=Decimal("3.5"))
    assert await store.upsert(SID, [rich], "rest") == [UNCHANGED]
    await store.upsert("x:derived", [c], "derived", complete=False)
    await store.aclose()
    store = await backend.open()
    (stored,) = await store.range(SID, 0, 120)
    assert stored.candle.trades == 7 and stored.candle.quote_volume == Decimal("3.5")
    assert stored.source == "ws"  # an unchanged candle keeps its source
    (derived,) = await store.range("x:derived", 0, 120)
    assert derived.complete is False and derived.source == "derived"
    # the newer mark is taken without a revision
    assert await store.upsert("x:derived", [c], "derived") == [UNCHANGED]
    (derived,) = await store.range("x:derived", 0, 120)
    assert derived.complete is True
    await store.aclose()


EXACT = [
    "0.00000001",
    "1E-8",
    "0.000000010",
    "123456789012345678901234567890.123456789012345678901234567890",
    "65432.10",
    "0",
    "0E-8",
    "100",
    "1E+2",
]


async def test_exact_decimals_round_trip(backend: Backend) -> None:
    """What comes back is the Decimal that went in: the same value and the same scale (the
    text SQLite writes, ``format(d, "f")``)."""
    store = await backend.open()
    candles = [
        Candle(60 * i, Decimal(t), Decimal(t), Decimal(t), Decimal(t), Decimal(t), Decimal(t), 3)
        for i, t in enumerate(EXACT)
    ]
    await store.upsert(SID, candles, "rest")
    stored = [s.candle for s in await store.range(SID, 0, 60 * len(EXACT))]
    assert [format(s.open, "f") for s in stored] == [format(Decimal(t), "f") for t in EXACT]
    assert [s.quote_volume for s in stored] == [Decimal(t) for t in EXACT]
    assert [str(s.quote_volume) for s in stored] == [str(s.open) for s in stored]
    assert stored == candles  # numerically equal, every field
    assert await store.upsert(SID, candles, "ws") == [UNCHANGED] * len(EXACT)
    await store.aclose()


def _random_batches(seed: int) -> list[tuple[list[Candle], Source, bool]]:
    rng = random.Random(seed)
    prices = ["1", "1.0", "1.00", "2", "2.5", "0.1"]
    sources: list[Source] = ["ws", "rest", "derived"]
    batches = []
    for _ in range(60):
        candles = []
        for _ in range(rng.randint(1, 12)):
            p = [rng.choice(prices) for _ in range(4)]
            c = candle(60 * rng.randint(0, 15), p[0], p[1], p[2], p[3], rng.choice(prices))
            if rng.random() < 0.3:
                c = attrs.evolve(c, trades=rng.randint(1, 3), taker_buy_base=Decimal("0.5"))
            candles.append(c)
        batches.append((candles, rng.choice(sources), rng.random() < 0.8))
    return batches


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_random_upserts_give_these_outcomes_and_rows(backend: Backend, seed: int) -> None:
    """Both backends run the same random batches; the outcomes and the stored rows (text
    included) are compared with a model of the rule written here."""
    store = await backend.open()
    model: dict[int, tuple[Candle, Source, bool]] = {}
    for candles, source, complete in _random_batches(seed):
        expected = []
        for c in candles:
            old = model.get(c.candle_time)
            if old is None:
                expected.append(NEW)
                model[c.candle_time] = (c, source, complete)
            elif not old[0].same_values(c):
                expected.append(REVISED)
                model[c.candle_time] = (c, source, complete)
            else:
                expected.append(UNCHANGED)
                o = old[0]
                merged = attrs.evolve(
                    o,
                    trades=o.trades if o.trades is not None else c.trades,
                    taker_buy_base=o.taker_buy_base or c.taker_buy_base,
                )
                model[c.candle_time] = (merged, old[1], complete)
        assert await store.upsert(SID, candles, source, complete=complete) == expected
    stored = await store.range(SID, 0, 10_000)
    assert [(str(s.candle.open), s.candle.trades, s.source, s.complete) for s in stored] == [
        (str(c.open), c.trades, src, done) for c, src, done in (model[t] for t in sorted(model))
    ]
    await store.aclose()


async def test_event_log_ids_filters_and_retention(backend: Backend) -> None:
    store = await backend.open()
    assert await store.events_newest_id() == 0

    def append(txn: WriteTxn) -> list[int]:
        return [
            txn.append_event(sid, "factor.rebuild", {"n": i, "z": [1, "a"]}, 1000.0 + i)
            for i, sid in enumerate(["a", "b", "a", "c"])
        ]

    ids = await store.write(append)
    assert await store.events_newest_id() == ids[-1]
    assert ids == sorted(ids) and len(set(ids)) == 4
    events = await store.events_after(0)
    assert [(e.event_id, e.series_id, e.data) for e in events][:1] == [
        (ids[0], "a", {"n": 0, "z": [1, "a"]})
    ]
    assert [e.event_id for e in await store.events_after(ids[0], ["a", "c"])] == ids[2:]
    assert [e.event_id for e in await store.events_after(0, limit=2)] == ids[:2]
    assert await store.events_pruned_upto() == 0
    # keep the newest two: everything up to the second id is pruned
    assert await store.write(lambda txn: txn.prune_events(2, 0.0)) == ids[1]
    assert await store.events_pruned_upto() == ids[1]
    assert [e.event_id for e in await store.events_after(0)] == ids[2:]
    # pruning everything never lets an id be given again, even after a reopen
    assert await store.write(lambda txn: txn.prune_events(100, 10_000.0)) == ids[3]
    assert await store.events_newest_id() == ids[3]  # the newest given, though pruned
    await store.aclose()
    store = await backend.open()
    (next_id,) = await store.write(lambda txn: [txn.append_event("a", "gap", {}, 1.0)])
    assert next_id > ids[3]
    await store.aclose()


async def test_meta(backend: Backend) -> None:
    store = await backend.open()
    assert await store.get_meta("k") is None
    await store.set_meta("k", "v1")
    await store.set_meta("k", "v2")
    assert await store.get_meta("k") == "v2"
    assert await store.write(lambda txn: txn.get_meta("k")) == "v2"
    await store.aclose()


async def test_failed_write_rolls_back_whole_transaction(backend: Backend) -> None:
    store = await backend.open()

    def half_then_fail(txn: WriteTxn) -> None:
        txn.upsert(SID, [candle(60, "1", "1", "1", "1")], "ws")
        txn.append_event(SID, "gap", {}, 1.0)
        txn.set_meta("k", "v")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.write(half_then_fail)
    assert await store.head_time(SID) is None
    assert await store.events_after(0) == []
    assert await store.get_meta("k") is None
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.upsert(SID, [candle(120, "1", "1", "1", "1")], "ws")


async def test_read_while_a_large_write_runs(backend: Backend) -> None:
    """A reader sees the last commit and finishes while a long write transaction is open."""
    store = await backend.open()
    await store.upsert(SID, list(flat_minutes(0, 5)), "ws")
    write_started = trio.Event()
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def long_write(txn: WriteTxn) -> None:
        txn.upsert(SID, list(flat_minutes(300, 20_000)), "rest")
        trio.from_thread.run_sync(write_started.set, trio_token=token)
        trio.from_thread.run(release.wait, trio_token=token)

    reads: list[int | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, long_write)
        await write_started.wait()
        with trio.fail_after(5):  # a bound on a hang, not a timed assertion
            reads.append(await store.head_time(SID))
            reads.append(len(await store.tail(SID, 100)))
        release.set()
    assert reads == [240, 5]
    assert await store.head_time(SID) == 300 + 60 * 19_999
    await store.aclose()


async def test_a_write_waiting_for_the_writer_survives_cancellation(backend: Backend) -> None:
    store = await backend.open()
    write_started = trio.Event()
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def long_write(txn: WriteTxn) -> None:
        trio.from_thread.run_sync(write_started.set, trio_token=token)
        trio.from_thread.run(release.wait, trio_token=token)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, long_write)
        await write_started.wait()
        with trio.CancelScope() as scope:

            async def cancel_then_release() -> None:
                scope.cancel()  # cancelled while waiting for the writer
                release.set()

            nursery.start_soon(cancel_then_release)
            await store.upsert(SID, [candle(60, "1", "1", "1", "1")], "ws")
    assert await store.head_time(SID) == 60
    await store.aclose()


async def test_write_sequence_moves_by_one_unless_another_store_wrote(backend: Backend) -> None:
    """``sequence`` tells the pipeline whether its cache of recent bars still holds: one more
    than its own last write transaction only if nobody else wrote in between."""
    mine, other = await backend.open(), await backend.open()

    def number(txn: WriteTxn) -> int:
        return txn.sequence

    def write_and_number(at: int) -> Callable[[WriteTxn], int]:
        def run(txn: WriteTxn) -> int:
            txn.write_rows([(SID, StoredCandle(candle(at, "1", "1", "1", "1"), "ws", True))])
            return txn.sequence

        return run

    first = await mine.write(write_and_number(60))
    second = await mine.write(number)
    assert second == first + 1
    await other.write(write_and_number(120))
    third = await mine.write(number)
    assert third > second + 1
    # write_rows wrote exactly the rows given, and first_time sees them from both stores
    assert [s.candle.candle_time for s in await other.range(SID, 0, 1000)] == [60, 120]
    assert await mine.write(lambda txn: txn.first_time(SID)) == 60
    await mine.aclose()
    await other.aclose()


async def test_meta_another_store_wrote_is_seen_and_a_rolled_back_one_is_not(
    backend: Backend,
) -> None:
    """A write transaction sees the meta table as committed, whoever wrote it last (the
    PostgreSQL store keeps the table between its writes while nobody else writes)."""
    mine, other = await backend.open(), await backend.open()
    await mine.set_meta("k", "mine")
    assert await mine.write(lambda txn: txn.get_meta("k")) == "mine"
    await other.set_meta("k", "other")
    assert await mine.write(lambda txn: txn.get_meta("k")) == "other"

    def set_then_fail(txn: WriteTxn) -> None:
        txn.set_meta("k", "rolled back")
        txn.set_meta("new", "rolled back")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await mine.write(set_then_fail)
    assert await mine.write(lambda txn: (txn.get_meta("k"), txn.get_meta("new"))) == (
        "other",
        None,
    )
    assert await other.write(lambda txn: txn.get_meta("k")) == "other"
    await mine.aclose()
    await other.aclose()


async def test_write_rows_keep_any_series_id_text_and_every_scale(backend: Backend) -> None:
    """Rows go in exactly as given: series ids with quotes, backslashes, commas and braces,
    prices with exponents and trailing zeros, absent extras, both marks."""
    store = await backend.open()
    odd = ['we"ird\\id', "a,b{c}", "plain:1m", "NULL", " spaced "]
    rows = []
    for i, sid in enumerate(odd):
        p = Decimal(EXACT[i % len(EXACT)])
        c = Candle(60 * i, p, p, p, p, Decimal("1E-8"), None if i % 2 else Decimal("2.50"), i)
        rows.append((sid, StoredCandle(c, "derived" if i % 2 else "ws", bool(i % 2))))
    await store.write(lambda txn: txn.write_rows(rows))
    for sid, written in rows:
        (stored,) = await store.range(sid, 0, 1000)
        assert stored == written
        assert [format(v, "f") for v in (stored.candle.open, stored.candle.volume)] == [
            format(v, "f") for v in (written.candle.open, written.candle.volume)
        ]
    await store.aclose()


async def test_a_write_that_fails_on_this_store_s_last_view_sees_another_store_s_commit(
    backend: Backend,
) -> None:
    """The PostgreSQL store runs a write's function on what its own last write left while
    the transaction's start is on its way; another store's commit in between (a fence that
    moved, an event id taken) rolls that attempt back and the function runs again on what
    is committed."""
    mine, other = await backend.open(), await backend.open()
    await mine.set_meta("fence", "1")
    await other.set_meta("fence", "2")
    taken = await other.write(lambda txn: txn.append_event(SID, "e", {"by": "other"}, 0.0))

    def fenced(txn: WriteTxn) -> int:
        if txn.get_meta("fence") != "2":
            raise RuntimeError("fenced out")
        return txn.append_event(SID, "e", {"by": "mine"}, 0.0)

    assert await mine.write(fenced) == taken + 1
    logged = await mine.events_after(0)
    assert [(e.event_id, e.data) for e in logged] == [
        (taken, {"by": "other"}),
        (taken + 1, {"by": "mine"}),
    ]
    await mine.aclose()
    await other.aclose()
