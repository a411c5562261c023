from __future__ import annotations

import gc
import math
from collections.abc import Sequence
from decimal import Decimal
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import candle, flat_minutes
from tradecanvas.errors import CandleError, PublishError, StoreError
from tradecanvas.model import Candle, SeriesId, Timeframe, validate_candle
from tradecanvas.pipeline.commit import (
    IngestBatch,
    IngestPipeline,
    _plainly_valid_minutes,
    collector_paused,
)
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.store.txn import StoreTxn

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
ETH = SeriesId.parse("binance:futures:ETH/USDT:1m")
BTC5 = "binance:futures:BTC/USDT:5m"
FP = "binance-exact-v1;derived=5m"


class RecordingTarget:
    """Records what the pipeline queues, in order; fails for the series named in ``failing``."""

    def __init__(self, failing: Sequence[str] = ()) -> None:
        self.failing = set(failing)
        self.log: list[tuple[str, str, object]] = []

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        self.log.append(("closed", series_id, [c.candle_time for c in candles]))
        if series_id in self.failing:
            return [f"subscriber 1 of {series_id} is gone"]
        return []

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        self.log.append(("system", event.series_id, event.reason))
        if "system" in self.failing:
            raise RuntimeError("sink down")
        return []


async def _pipeline(
    tmp_path: Path, target: RecordingTarget | None = None, fp: str = FP, tfs: str = "5m"
) -> IngestPipeline:
    store = await CandleStore.open(tmp_path / "m.sqlite3")
    return IngestPipeline(
        store,
        target or RecordingTarget(),
        [Timeframe.parse(t) for t in tfs.split(",")],
        fp,
    )


def _reasons(events: Sequence[SystemEvent]) -> list[tuple[str, str, int | None, int | None]]:
    return [(e.series_id, e.reason, e.from_time, e.to_time) for e in events]


async def test_dedupe_within_batch_and_new_series(tmp_path: Path) -> None:
    p = await _pipeline(tmp_path)
    minutes = list(flat_minutes(0, 5))
    result = await p.run(IngestBatch.of(BTC, [*minutes, minutes[2], minutes[0]], "ws"))
    assert result.duplicates_dropped == 2
    assert [u.series_id for u in result.updates] == [str(BTC), BTC5]
    assert [c.candle_time for c in result.updates[0].candles] == [0, 60, 120, 180, 240]
    assert _reasons(result.events) == [(str(BTC), "new_series", 0, 240), (BTC5, "new_series", 0, 0)]
    await p.store.aclose()


async def test_idempotent_reingest(tmp_path: Path) -> None:
    p = await _pipeline(tmp_path)
    batch = IngestBatch.of(BTC, list(flat_minutes(0, 10)), "ws")
    await p.run(batch)
    again = await p.run(batch)
    assert again.updates == () and again.events == ()
    assert len(await p.store.range(str(BTC), 0, 10_000)) == 10
    assert len(await p.store.range(BTC5, 0, 10_000)) == 2
    await p.store.aclose()


async def test_backfill_below_head_rebuilds_and_rederives(tmp_path: Path) -> None:
    p = await _pipeline(tmp_path)
    minutes = [
        candle(60 * i, str(100 + i), str(101 + i), str(99 + i), str(100 + i)) for i in range(10)
    ]
    await p.run(IngestBatch.of(BTC, minutes[:2] + minutes[5:], "ws"))
    # bucket 0 lacks 120..240 but a later minute is stored: finalised as incomplete
    (first,) = await p.store.range(BTC5, 0, 300)
    assert first.complete is False and first.candle.close == Decimal(101)
    result = await p.run(IngestBatch.of(BTC, minutes[2:5], "rest"))
    assert _reasons(result.events) == [(str(BTC), "backfill", 120, 240), (BTC5, "revision", 0, 0)]
    (fixed,) = await p.store.range(BTC5, 0, 300)
    assert fixed.complete is True
    assert (fixed.candle.open, fixed.candle.high, fixed.candle.low, fixed.candle.close) == (
        Decimal(100),
        Decimal(105),
        Decimal(99),
        Decimal(104),
    )
    await p.store.aclose()


async def test_incomplete_last_bucket_waits_for_a_later_minute(tmp_path: Path) -> None:
    p = await _pipeline(tmp_path)
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(0, 3)), "ws"))
    assert [u.series_id for u in result.updates] == [str(BTC)]  # bucket still filling
    # the exchange has nothing for 180..240 (confirmed hole); 300 arrives
    result = await p.run(IngestBatch.of(BTC, [candle(300, "100", "100", "100", "100")], "ws"))
    assert [(u.series_id, [c.candle_time for c in u.candles]) for u in result.updates] == [
        (str(BTC), [300]),
        (BTC5, [0]),
    ]
    (stored,) = await p.store.range(BTC5, 0, 300)
    assert stored.complete is False
    await p.store.aclose()


async def test_an_absent_run_settles_the_bucket_it_ends_without_a_candle_above(
    tmp_path: Path,
) -> None:
    """The ingest loop commits minutes confirmed absent at the live edge on their own: the
    5m bucket they end is finalised (incomplete, with a gap) in that transaction, before
    the next bucket's first minute exists — so its forming bar cannot overtake it."""
    p = await _pipeline(tmp_path)
    await p.run(IngestBatch.of(BTC, list(flat_minutes(0, 3)), "ws"))
    result = await p.run(IngestBatch((), "rest", absent=((BTC, 180, 300),)))
    assert [(u.series_id, [c.candle_time for c in u.candles]) for u in result.updates] == [
        (BTC5, [0])
    ]
    assert [(e.event, e.series_id, e.reason) for e in result.events] == [
        ("gap", str(BTC), "exchange"),
        ("factor.rebuild", BTC5, "new_series"),
        ("gap", BTC5, "incomplete"),
    ]
    (stored,) = await p.store.range(BTC5, 0, 300)
    assert stored.complete is False
    # the minute above the hole: nothing about bucket 0 again
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(300, 1)), "ws"))
    assert [u.series_id for u in result.updates] == [str(BTC)]
    assert [e.event for e in result.events] == []
    await p.store.aclose()


async def test_an_incomplete_bucket_is_final_once_its_last_minute_is_stored(
    tmp_path: Path,
) -> None:
    """Its last minute stored, the loop's tracker has settled every minute before it: the
    bar goes out with that minute, not one minute later."""
    p = await _pipeline(tmp_path)
    await p.run(IngestBatch.of(BTC, list(flat_minutes(0, 2)), "ws"))
    result = await p.run(
        IngestBatch(
            ((BTC, candle(240, "100", "100", "100", "100")),), "ws", absent=((BTC, 120, 240),)
        )
    )
    assert [(u.series_id, [c.candle_time for c in u.candles]) for u in result.updates] == [
        (str(BTC), [240]),
        (BTC5, [0]),
    ]
    await p.store.aclose()


async def test_revision_event(tmp_path: Path) -> None:
    p = await _pipeline(tmp_path)
    await p.run(IngestBatch.of(BTC, list(flat_minutes(0, 5)), "ws"))
    result = await p.run(
        IngestBatch.of(
            BTC, [candle(120, "100", "130", "100", "100"), *flat_minutes(300, 1)], "rest"
        )
    )
    assert _reasons(result.events) == [(str(BTC), "revision", 120, 120), (BTC5, "revision", 0, 0)]
    base, derived = result.updates
    assert [c.candle_time for c in base.candles] == [120, 300] and base.revised == 1
    assert derived.candles[0].high == Decimal(130) and derived.revised == 1
    await p.store.aclose()


async def test_fingerprint_change_once_per_series(tmp_path: Path) -> None:
    p = await _pipeline(tmp_path)
    await p.run(IngestBatch.of(BTC, list(flat_minutes(0, 5)), "ws"))
    await p.store.aclose()
    p = await _pipeline(tmp_path, fp="binance-exact-v1;derived=5m,15m", tfs="5m,15m")
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(300, 5)), "ws"))
    assert (str(BTC), "fingerprint", 0, 240) in _reasons(result.events)
    assert (BTC5, "fingerprint", 0, 0) in _reasons(result.events)
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(600, 5)), "ws"))
    assert all(e.reason != "fingerprint" for e in result.events)
    await p.store.aclose()
    # same settings after a restart: no event
    p = await _pipeline(tmp_path, fp="binance-exact-v1;derived=5m,15m", tfs="5m,15m")
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(900, 5)), "ws"))
    assert all(e.reason != "fingerprint" for e in result.events)
    await p.store.aclose()


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (candle(61, "1", "1", "1", "1"), "not aligned"),
        (candle(60, "1", "1", "2", "1"), "below low"),
        (candle(60, "1", "1", "1", "1", "-1"), "volume must not be negative"),
    ],
)
async def test_bad_candle_rejects_whole_batch(tmp_path: Path, bad: Candle, message: str) -> None:
    p = await _pipeline(tmp_path)
    with pytest.raises(CandleError, match=message):
        await p.run(IngestBatch.of(BTC, [candle(0, "1", "1", "1", "1"), bad], "http"))
    assert await p.store.heads() == {}
    await p.store.aclose()


async def test_batch_meta_is_stored_with_the_candles_or_not_at_all(tmp_path: Path) -> None:
    p = await _pipeline(tmp_path)
    refused = IngestBatch(
        ((BTC, candle(0, "1", "1", "1", "1")), (BTC, candle(61, "1", "1", "1", "1"))),
        "ws",
        meta=(("unresolved_holes:x", "[[0,60]]"),),
    )
    with pytest.raises(CandleError):
        await p.run(refused)
    assert await p.store.get_meta("unresolved_holes:x") is None
    good = IngestBatch(refused.candles[:1], "ws", meta=refused.meta)
    await p.run(good)
    assert await p.store.get_meta("unresolved_holes:x") == "[[0,60]]"
    assert [s.candle.candle_time for s in await p.store.range(str(BTC), 0, 600)] == [0]
    await p.store.aclose()


async def test_publish_order_series_id_then_system(tmp_path: Path) -> None:
    target = RecordingTarget()
    p = await _pipeline(tmp_path, target)
    batch = IngestBatch(
        tuple((s, c) for s in (ETH, BTC) for c in flat_minutes(0, 5)),
        "ws",
    )
    result = await p.run(batch)
    assert p.publish(result, best_effort=True) == 0
    kinds = [(kind, sid) for kind, sid, _ in target.log]
    closed = [sid for kind, sid in kinds if kind == "closed"]
    assert closed == sorted(closed) == [str(BTC), BTC5, str(ETH), "binance:futures:ETH/USDT:5m"]
    first_system = next(i for i, (kind, _) in enumerate(kinds) if kind == "system")
    assert all(kind == "system" for kind, _ in kinds[first_system:])
    assert len(kinds) - first_system == len(result.events) == 4
    assert [u.series_id for u in result.in_legacy_order()] == [
        str(BTC),
        str(ETH),
        BTC5,
        "binance:futures:ETH/USDT:5m",
    ]
    await p.store.aclose()


async def test_best_effort_continues_after_failing_step(tmp_path: Path) -> None:
    target = RecordingTarget(failing=[str(BTC), "system"])
    p = await _pipeline(tmp_path, target)
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(0, 5)), "ws"))
    assert p.publish(result, best_effort=True) == 3  # BTC closed + two system events
    assert [kind for kind, _, _ in target.log] == ["closed", "closed", "system", "system"]
    assert p.statistics().publish_failed_steps == 3
    await p.store.aclose()


async def test_strict_raises_once_every_step_has_run(tmp_path: Path) -> None:
    """The failing step does not keep the other series or the system events (which are
    not stored, so could not be healed) from the healthy subscribers."""
    target = RecordingTarget(failing=[str(BTC)])
    p = await _pipeline(tmp_path, target)
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(0, 5)), "http"))
    with pytest.raises(PublishError, match="subscriber 1 of") as info:
        p.publish(result, best_effort=False)
    assert [kind for kind, _, _ in target.log] == ["closed", "closed", "system", "system"]
    assert len(info.value.failures) == 1 and info.value.failures[0].startswith(f"closed {BTC}")
    assert p.statistics().publish_failed_steps == 1
    # the candles were committed anyway
    assert await p.store.head_time(str(BTC)) == 240
    await p.store.aclose()


async def test_history_starting_inside_a_bucket_gives_no_partial_first_bar(
    tmp_path: Path,
) -> None:
    """An initial backfill from 04:02 must not publish a 5m bar for 04:00 built from three
    of its five minutes; once the earlier minutes are backfilled, the bar appears."""
    p = await _pipeline(tmp_path)
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(120, 10)), "rest"))
    assert [c.candle_time for u in result.updates if u.derived for c in u.candles] == [300]
    assert [s.candle.candle_time for s in await p.store.range(BTC5, 0, 10_000)] == [300]
    result = await p.run(IngestBatch.of(BTC, list(flat_minutes(0, 2)), "rest"))
    assert [s.candle.candle_time for s in await p.store.range(BTC5, 0, 10_000)] == [0, 300]
    (first,) = await p.store.range(BTC5, 0, 300)
    assert first.complete
    await p.store.aclose()


# --- the fast path's cache of recent bars stays true to the store ------------------------


@pytest.mark.parametrize("writer", ["same store", "other connection"])
async def test_a_write_by_someone_else_between_commits_is_seen(tmp_path: Path, writer: str) -> None:
    """RecentBars is forgotten when anything but the pipeline wrote: another caller of the
    same store, or another connection to the file (another process)."""
    p = await _pipeline(tmp_path)
    await p.run(IngestBatch.of(BTC, flat_minutes(0, 4), "ws"))
    revised = [candle(60, "100", "107", "93", "100")]
    if writer == "same store":
        await p.store.upsert(str(BTC), revised, "rest")
    else:
        other = await CandleStore.open(tmp_path / "m.sqlite3")
        await other.upsert(str(BTC), revised, "rest")
        await other.aclose()
    result = await p.run(IngestBatch.of(BTC, [candle(240, "100", "100", "100", "100")], "ws"))
    [derived] = [u for u in result.updates if u.derived]
    assert (derived.candles[0].high, derived.candles[0].low) == (Decimal(107), Decimal(93))
    await p.store.aclose()


async def test_a_failed_commit_leaves_nothing_cached(tmp_path: Path) -> None:
    p = await _pipeline(tmp_path)
    await p.run(IngestBatch.of(BTC, flat_minutes(0, 4), "ws"))
    await p.store.write(
        lambda txn: cast(StoreTxn, txn)._conn.execute(  # a real failure late in the txn
            "CREATE TRIGGER no_eth BEFORE INSERT ON events WHEN NEW.series_id LIKE '%ETH%'"
            " BEGIN SELECT RAISE(ABORT, 'refused'); END"
        )
    )
    both = IngestBatch(
        ((BTC, candle(240, "1", "1", "1", "1")), (ETH, candle(0, "1", "1", "1", "1"))), "ws"
    )
    with pytest.raises(StoreError, match="refused"):
        await p.run(both)
    # the next commit (the very next transaction) must not trust what the failed one put in
    result = await p.run(IngestBatch.of(BTC, [candle(240, "1", "1", "1", "1")], "ws"))
    assert [(u.series_id, [c.candle_time for c in u.candles]) for u in result.updates] == [
        (str(BTC), [240]),
        (BTC5, [0]),
    ]
    assert [s.candle.candle_time for s in await p.store.range(str(BTC), 0, 600)] == [
        0, 60, 120, 180, 240,
    ]  # fmt: skip
    await p.store.aclose()


_decimals = st.sampled_from(
    [
        Decimal(x)
        for x in (
            *("-1", "0", "0.5", "1", "1.0", "2", "9", "NaN", "sNaN", "Infinity", "-Infinity"),
            *("9.99e29", "1e30", "1e999"),  # 1e999: a finite Decimal, an infinite double
        )
    ]
)


@given(
    st.builds(
        Candle,
        st.one_of(st.integers(-60, 600), st.booleans()),
        _decimals,
        _decimals,
        _decimals,
        _decimals,
        _decimals,
        st.none() | _decimals,
        st.none() | st.integers(-1, 3) | st.sampled_from((2**53, 2**53 + 1, 2**70)),
        st.none() | _decimals,
        st.none() | _decimals,
    )
)
def test_the_quick_validity_check_agrees_with_validate_candle(c: Candle) -> None:
    try:
        validate_candle(c, BTC.timeframe)
        valid = True
    except CandleError:
        valid = False
    assert _plainly_valid_minutes([(BTC, c)]) == valid
    if valid and type(c.candle_time) is int:  # what clients get of a valid one is all numbers
        assert all(math.isfinite(v) for v in c.to_wire().values())
    # a series not of minutes fails it (run then refuses the batch), as does any bad pair
    assert not _plainly_valid_minutes([(BTC, c), (BTC.with_timeframe(Timeframe.parse("5m")), c)])
    assert _plainly_valid_minutes([(BTC, c), (BTC, c)]) == valid


def test_the_collector_is_paused_around_a_commit_and_restored_after() -> None:
    seen: list[bool] = []
    with collector_paused():
        seen.append(gc.isenabled())
    assert seen == [False] and gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("the commit failed")
    assert gc.isenabled()
    gc.disable()  # paused by someone else: left as it was
    try:
        with collector_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()
