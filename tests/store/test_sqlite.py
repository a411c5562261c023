from __future__ import annotations

import sqlite3
from decimal import Decimal
from pathlib import Path

import pytest
import trio
import trio.testing

from tests.conftest import candle, flat_minutes
from tradecanvas.errors import StoreError
from tradecanvas.model import Candle
from tradecanvas.store.sqlite import SCHEMA_VERSION, CandleStore, StoredCandle, UpsertOutcome

SID = "binance:futures:BTC/USDT:1m"


async def test_upsert_is_idempotent_and_detects_revisions(tmp_path: Path) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    first = [candle(60, "1.0", "2", "1", "2"), candle(120, "2", "3", "2", "3")]
    assert await store.upsert(SID, first, "ws") == [UpsertOutcome.NEW, UpsertOutcome.NEW]
    assert await store.upsert(SID, first, "ws") == [UpsertOutcome.UNCHANGED] * 2
    # the same values written differently are the same candle
    same = [candle(60, "1.00", "2.0", "1", "2.000")]
    assert await store.upsert(SID, same, "rest") == [UpsertOutcome.UNCHANGED]
    changed = [candle(120, "2", "3.5", "2", "3")]
    assert await store.upsert(SID, changed, "rest") == [UpsertOutcome.REVISED]
    stored = await store.range(SID, 0, 1000)
    assert [s.candle.high for s in stored] == [Decimal(2), Decimal("3.5")]
    assert [s.source for s in stored] == ["ws", "rest"]
    # the exact text first received is kept
    assert str(stored[0].candle.open) == "1.0"
    await store.aclose()


async def test_reads_tail_since_range_head(tmp_path: Path) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    await store.upsert(SID, list(flat_minutes(0, 10)), "rest")
    assert await store.head_time(SID) == 540
    assert await store.head_time("binance:spot:ETH/USDT:1m") is None
    assert [c.candle_time for c in await store.tail(SID, 3)] == [420, 480, 540]
    assert [c.candle_time for c in await store.since(SID, 120, 2)] == [180, 240]
    assert [c.candle_time for c in await store.since(SID, 540, 10)] == []
    assert [s.candle.candle_time for s in await store.range(SID, 60, 180)] == [60, 120]
    heads = await store.heads()
    assert (heads[SID].head_time, heads[SID].first_time, heads[SID].count) == (540, 0, 10)
    await store.aclose()


async def test_reopen_keeps_everything_and_extras(tmp_path: Path) -> None:
    path = tmp_path / "m.sqlite3"
    store = await CandleStore.open(path)
    c = candle(60, "1", "2", "1", "2")
    await store.upsert(SID, [c], "ws")
    # a later copy with Binance's extras fills them in without being a revision
    import attrs

    rich = attrs.evolve(c, trades=7, quote_volume=Decimal("3.5"))
    assert await store.upsert(SID, [rich], "rest") == [UpsertOutcome.UNCHANGED]
    await store.upsert("x:derived", [c], "derived", complete=False)
    await store.aclose()
    store = await CandleStore.open(path)
    (stored,) = await store.range(SID, 0, 120)
    assert stored.candle.trades == 7 and stored.candle.quote_volume == Decimal("3.5")
    (derived,) = await store.range("x:derived", 0, 120)
    assert derived.complete is False and derived.source == "derived"
    await store.aclose()


async def test_migration_from_an_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.sqlite3"
    path.touch()
    store = await CandleStore.open(path)
    await store.aclose()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


async def test_newer_schema_and_corrupt_file_are_refused(tmp_path: Path) -> None:
    newer = tmp_path / "newer.sqlite3"
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreError, match="newer than this tradecanvas"):
        await CandleStore.open(newer)
    corrupt = tmp_path / "corrupt.sqlite3"
    corrupt.write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"corrupt\.sqlite3"):
        await CandleStore.open(corrupt)


async def test_failed_write_rolls_back_whole_transaction(tmp_path: Path) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")

    def half_then_fail(txn: object) -> None:
        from tradecanvas.store.sqlite import StoreTxn

        assert isinstance(txn, StoreTxn)
        txn.upsert(SID, [candle(60, "1", "1", "1", "1")], "ws")
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        await store.write(half_then_fail)
    assert await store.head_time(SID) is None
    await store.aclose()


async def test_read_while_a_large_write_runs(tmp_path: Path) -> None:
    """A reader sees the last commit and finishes while a long write transaction is open."""
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    await store.upsert(SID, list(flat_minutes(0, 5)), "ws")
    write_started = trio.Event()
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def long_write(txn: object) -> None:
        from tradecanvas.store.sqlite import StoreTxn

        assert isinstance(txn, StoreTxn)
        txn.upsert(SID, list(flat_minutes(300, 20_000)), "rest")
        trio.from_thread.run_sync(write_started.set, trio_token=token)
        trio.from_thread.run(release.wait, trio_token=token)

    reads: list[int | None] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(store.write, long_write)
        await write_started.wait()
        # the write is open and uncommitted: reads must not wait for it
        with trio.fail_after(5):
            reads.append(await store.head_time(SID))
            reads.append(len(await store.tail(SID, 100)))
        release.set()
    assert reads == [240, 5]
    assert await store.head_time(SID) == 300 + 60 * 19_999
    await store.aclose()


async def test_sqlite_failure_is_a_store_error_and_nothing_is_half_written(
    tmp_path: Path,
) -> None:
    path = tmp_path / "m.sqlite3"
    store = await CandleStore.open(path)
    await store.upsert(SID, [candle(60, "1", "1", "1", "1")], "ws")

    def write_then_hit_read_only(txn: object) -> None:
        from tradecanvas.store.sqlite import StoreTxn

        assert isinstance(txn, StoreTxn)
        txn.upsert(SID, [candle(120, "1", "1", "1", "1")], "ws")
        txn._conn.execute("PRAGMA query_only = ON")
        try:
            txn.upsert(SID, [candle(180, "1", "1", "1", "1")], "ws")
        finally:
            txn._conn.execute("PRAGMA query_only = OFF")

    with pytest.raises(StoreError, match="readonly"):
        await store.write(write_then_hit_read_only)
    assert await store.head_time(SID) == 60
    await store.aclose()
    with pytest.raises(StoreError, match="closed"):
        await store.upsert(SID, [candle(120, "1", "1", "1", "1")], "ws")


async def test_a_write_waiting_for_the_writer_survives_cancellation(tmp_path: Path) -> None:
    """A caller cancelled while another write runs still gets its write committed: it may
    already have taken the candles out of its own buffer."""
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    write_started = trio.Event()
    release = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def long_write(txn: object) -> None:
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


async def test_upsert_of_scattered_times_reads_them_exactly(tmp_path: Path) -> None:
    """Times far apart are looked up by value (not one scan of everything between)."""
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    await store.upsert(SID, list(flat_minutes(0, 50)), "rest")
    far = [candle(60, "100", "100", "100", "100"), candle(600_000, "1", "1", "1", "1")]
    far += [candle(60 * 40, "100", "101", "100", "100")]
    outcomes = await store.upsert(SID, sorted(far, key=lambda c: c.candle_time), "ws")
    assert outcomes == [UpsertOutcome.UNCHANGED, UpsertOutcome.REVISED, UpsertOutcome.NEW]
    assert [s.candle.high for s in await store.range(SID, 2400, 2401)] == [Decimal(101)]
    await store.aclose()


async def test_write_rows_first_time_and_the_sequence(tmp_path: Path) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    rows = [StoredCandle(c, "derived", i % 2 == 0) for i, c in enumerate(flat_minutes(120, 3))]
    assert await store.write(lambda txn: txn.first_time(SID)) is None
    await store.write(lambda txn: txn.write_rows([(SID, r) for r in rows]))
    assert await store.range(SID, 0, 1000) == rows
    assert await store.write(lambda txn: txn.first_time(SID)) == 120
    # one more per write transaction; more when another connection committed in between
    first = await store.write(lambda txn: txn.sequence)
    assert await store.write(lambda txn: txn.sequence) == first + 1
    other = await CandleStore.open(tmp_path / "m.sqlite3")
    await other.set_meta("k", "v")
    await other.aclose()
    assert await store.write(lambda txn: txn.sequence) > first + 2
    await store.aclose()


async def test_heads_of_names_each_series_with_rows_and_its_newest_time(tmp_path: Path) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    # more ids than one statement takes (_IN_CHUNK), every third with nothing stored
    sids = [f"binance:futures:S{i:04d}/USDT:1m" for i in range(1200)]
    stored = {sid: 60 * (i % 7 + 1) for i, sid in enumerate(sids) if i % 3}
    rows = [
        (sid, StoredCandle(c, "ws", True))
        for sid, head in stored.items()
        for c in flat_minutes(60, head // 60)
    ]
    await store.write(lambda txn: txn.write_rows(rows))
    assert await store.write(lambda txn: txn.heads_of(sids)) == stored
    assert await store.write(lambda txn: txn.heads_of([])) == {}
    await store.aclose()


async def test_decimals_are_stored_as_plain_text_never_in_exponent_form(tmp_path: Path) -> None:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    c = Candle(60, Decimal("1E+2"), Decimal("1E+2"), Decimal("0.0000001"), Decimal("5E+1"),
               Decimal("0E-8"), Decimal("1.50"), 3, None, Decimal("2E-7"))  # fmt: skip
    await store.upsert(SID, [c], "ws")
    await store.aclose()
    conn = sqlite3.connect(tmp_path / "m.sqlite3")
    row = conn.execute(
        "SELECT open, high, low, close, volume, quote_volume, taker_buy_base, taker_buy_quote"
        " FROM candles"
    ).fetchone()
    conn.close()
    assert row == ("100", "100", "0.0000001", "50", "0.00000000", "1.50", None, "0.0000002")


async def test_a_quick_write_commits_or_rolls_back_like_any_other(tmp_path: Path) -> None:
    """``quick`` runs the transaction's Python on the event loop's thread and only the
    COMMIT on a worker thread: the same all-or-nothing transaction."""
    store = await CandleStore.open(tmp_path / "m.sqlite3")

    def write(txn: object) -> int:
        from tradecanvas.store.sqlite import StoreTxn

        assert isinstance(txn, StoreTxn)
        txn.upsert(SID, [candle(60, "1", "1", "1", "1")], "ws")
        return txn.sequence

    def half_then_fail(txn: object) -> None:
        from tradecanvas.store.sqlite import StoreTxn

        assert isinstance(txn, StoreTxn)
        txn.upsert(SID, [candle(120, "1", "1", "1", "1")], "ws")
        raise RuntimeError("boom")

    first = await store.write(write, quick=True)
    with pytest.raises(RuntimeError):
        await store.write(half_then_fail, quick=True)
    assert await store.head_time(SID) == 60
    # the next write (quick or not) is numbered right after: nothing else was written
    assert await store.write(lambda txn: txn.sequence) == first + 2
    assert await store.write(lambda txn: txn.sequence, quick=True) == first + 3
    await store.aclose()


async def test_a_quick_write_waits_for_another_writer_off_the_event_loop(tmp_path: Path) -> None:
    """When another connection (another process) holds the write lock, a quick write waits
    for it on a worker thread: the event loop keeps running meanwhile, and the write goes
    in once the lock is free."""
    path = tmp_path / "m.sqlite3"
    store = await CandleStore.open(path)
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    done = trio.Event()

    async def quick_upsert() -> None:
        await store.write(
            lambda txn: txn.upsert(SID, [candle(60, "1", "1", "1", "1")], "ws"), quick=True
        )
        done.set()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(quick_upsert)
        # every task is blocked while the write waits: the loop was never held up by it
        await trio.testing.wait_all_tasks_blocked()
        assert not done.is_set()
        assert await store.head_time(SID) is None  # (a read runs meanwhile)
        other.execute("COMMIT")
    other.close()
    assert await store.head_time(SID) == 60
    await store.aclose()


async def test_a_file_in_the_way_of_the_folder_is_named(tmp_path: Path) -> None:
    # a path through a file: mkdir says "File exists", which names the wrong problem
    (tmp_path / "notes").write_text("a file")
    with pytest.raises(StoreError, match=r"notes is a file, not a folder$"):
        await CandleStore.open(tmp_path / "notes" / "deeper" / "market.sqlite3")
    assert (tmp_path / "notes").read_text() == "a file"
