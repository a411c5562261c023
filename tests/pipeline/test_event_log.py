"""The event log: every system event stored with the candles it concerns, under one strictly
increasing id, readable by cursor, bounded by the retention (DESIGN §10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import candle, flat_minutes
from tests.pipeline.test_commit import RecordingTarget
from tradecanvas.errors import CandleError
from tradecanvas.model import SeriesId, Timeframe
from tradecanvas.pipeline.commit import EventRetention, IngestBatch, IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.store.sqlite import CandleStore

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
BTC5 = "binance:futures:BTC/USDT:5m"
T0 = 1_700_000_100 - 1_700_000_100 % 300  # a 5m boundary


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def _open(
    path: Path, *, retention: EventRetention | None = None, clock: Clock | None = None
) -> IngestPipeline:
    store = await CandleStore.open(path / "events.sqlite3")
    return IngestPipeline(
        store,
        RecordingTarget(),
        [Timeframe.parse("5m")],
        "fp",
        retention=retention,
        clock=clock or Clock(),
    )


def _kinds(events: tuple[SystemEvent, ...] | list[SystemEvent]) -> list[tuple[str, str, str]]:
    return [(e.series_id, e.event, e.reason) for e in events]


async def test_events_are_logged_with_increasing_ids_and_read_back_by_cursor(
    tmp_path: Path,
) -> None:
    p = await _open(tmp_path)
    try:
        first = await p.run(IngestBatch.of(BTC, flat_minutes(T0, 10), "ws"))
        revised = list(flat_minutes(T0, 1, price="101"))
        second = await p.run(IngestBatch.of(BTC, revised, "rest"))
        ids = [e.event_id for e in (*first.events, *second.events) if e.event_id is not None]
        assert len(ids) == len(first.events) + len(second.events) >= 3
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        stored = await p.store.events_after(0)
        assert [s.event_id for s in stored] == ids
        assert [SystemEvent.from_stored(s) for s in stored] == [*first.events, *second.events]
        # by cursor and by series
        after_first = await p.store.events_after(ids[0])
        assert [s.event_id for s in after_first] == ids[1:]
        only_5m = await p.store.events_after(0, [BTC5])
        assert {s.series_id for s in only_5m} == {BTC5}
        wire = second.events[0].to_wire()
        assert wire["event_id"] == second.events[0].event_id
        assert wire["event"] == "factor.rebuild"
    finally:
        await p.store.aclose()


async def test_a_refused_batch_logs_no_event(tmp_path: Path) -> None:
    p = await _open(tmp_path)
    try:
        bad = [*flat_minutes(T0, 2), candle(T0 + 121, "1", "1", "1", "1")]  # misaligned
        with pytest.raises(CandleError):
            await p.run(IngestBatch.of(BTC, bad, "ws"))
        assert await p.store.events_after(0) == []
    finally:
        await p.store.aclose()


async def test_exchange_holes_and_incomplete_derived_bars_are_gap_events(tmp_path: Path) -> None:
    p = await _open(tmp_path)
    try:
        minutes = list(flat_minutes(T0, 10))
        del minutes[2]  # T0+120 is missing at the exchange: the first 5m bar is incomplete
        result = await p.run(
            IngestBatch(tuple((BTC, c) for c in minutes), "ws", absent=((BTC, T0 + 120, T0 + 180),))
        )
        gaps = [e for e in result.events if e.event == "gap"]
        assert [(e.series_id, e.reason, e.from_time, e.to_time) for e in gaps] == [
            (str(BTC), "exchange", T0 + 120, T0 + 120),
            (BTC5, "incomplete", T0, T0),
        ]
        # REST finds the minute after all: the 5m bar completes and a revision withdraws the gap
        late = list(flat_minutes(T0 + 120, 1))
        repaired = await p.run(IngestBatch.of(BTC, late, "rest"))
        assert (BTC5, "factor.rebuild", "revision") in _kinds(repaired.events)
        assert not [e for e in repaired.events if e.event == "gap"]
        stored = [s.event for s in await p.store.events_after(0, [BTC5])]
        assert stored.count("gap") == 1
    finally:
        await p.store.aclose()


async def test_served_series_changes_are_logged_once(tmp_path: Path) -> None:
    p = await _open(tmp_path)
    try:
        added = await p.record_served_series(["a:1m", "a:5m"])
        assert _kinds(added) == [
            ("a:1m", "series.added", "configured"),
            ("a:5m", "series.added", "configured"),
        ]
        assert await p.record_served_series(["a:1m", "a:5m"]) == ()
        changed = await p.record_served_series(["a:1m", "b:1m"])
        assert _kinds(changed) == [
            ("b:1m", "series.added", "configured"),
            ("a:5m", "series.removed", "unconfigured"),
        ]
    finally:
        await p.store.aclose()


async def test_retention_keeps_the_newest_and_remembers_what_it_pruned(tmp_path: Path) -> None:
    clock = Clock()
    p = await _open(tmp_path, retention=EventRetention(max_events=3, max_age_s=3600), clock=clock)
    try:
        ids: list[int] = []
        for i in range(6):
            clock.now += 61  # past the prune interval each time
            result = await p.run(
                IngestBatch.of(BTC, flat_minutes(T0 + 600 * i, 1, str(100 + i)), "ws")
            )
            ids.extend(e.event_id for e in result.events if e.event_id is not None)
        kept = [s.event_id for s in await p.store.events_after(0)]
        assert kept == ids[-3:]
        assert await p.store.events_pruned_upto() == ids[-4]
        # and by age: everything older than an hour goes at the next prune
        clock.now += 7200
        await p.run(IngestBatch.of(BTC, flat_minutes(T0 + 6000, 1), "ws"))
        assert await p.store.events_pruned_upto() == kept[-1]
    finally:
        await p.store.aclose()


async def test_ids_keep_increasing_across_a_reopen_and_a_full_prune(tmp_path: Path) -> None:
    clock = Clock()
    p = await _open(tmp_path, retention=EventRetention(max_events=100, max_age_s=10), clock=clock)
    first = await p.run(IngestBatch.of(BTC, flat_minutes(T0, 1), "ws"))
    await p.store.aclose()
    clock.now += 1000
    p = await _open(tmp_path, retention=EventRetention(max_events=100, max_age_s=10), clock=clock)
    try:
        second = await p.run(IngestBatch.of(BTC, flat_minutes(T0 - 600, 1), "ws"))
        assert second.events and first.events
        assert min(e.event_id or 0 for e in second.events) > max(
            e.event_id or 0 for e in first.events
        )
    finally:
        await p.store.aclose()
