"""BatchCommitter against a real SQLite store and IngestPipeline (no sockets)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import attrs
import orjson
import pytest
import trio
import trio.testing

from tests.conftest import flat_minutes
from tests.ingest.driver import bar, close_of, forming_of
from tests.ingest.rig import RecordingHub
from tradecanvas.ingest.batcher import BatchItem
from tradecanvas.ingest.committer import BatchCommitter
from tradecanvas.ingest.core import IngestCore
from tradecanvas.ingest.outcomes import Malformed
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.tracker import Released
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.store.sqlite import CandleStore

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
BTC5 = "binance:futures:BTC/USDT:5m"
T0 = 1_751_760_000


@attrs.define
class Rig:
    committer: BatchCommitter
    core: IngestCore
    store: CandleStore
    hub: RecordingHub
    reported: list[Malformed]


@asynccontextmanager
async def committer(tmp_path: Path, head: int | None = None) -> AsyncIterator[Rig]:
    flags = build_runtime_flags({"TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m"}).flags
    core = IngestCore([BTC], flags=flags, policy=IngestPolicy())
    core.load_series(BTC, head=head, first=head, unresolved=(), recent=())
    store = await CandleStore.open(tmp_path / "market.sqlite3")
    hub = RecordingHub()
    reported: list[Malformed] = []

    def emit_forming(sid: SeriesId, candle: Candle) -> None:
        for series_id, update in core.forming_updates(sid, candle):
            hub.publish_forming(series_id, update)

    try:
        yield Rig(
            BatchCommitter(
                core,
                pipeline=IngestPipeline(store, hub, (Timeframe.parse("5m"),), "fp"),
                hub=hub,
                metrics=Metrics(),
                enable_pipeline_publish=False,
                report_malformed=reported.append,
                emit_forming=emit_forming,
                name="test",
            ),
            core,
            store,
            hub,
            reported,
        )
    finally:
        await store.aclose()


def items(holes: tuple[tuple[int, int], ...] | None = None) -> list[BatchItem]:
    return [BatchItem(BTC, Released(c, "ws"), 0.0, holes) for c in flat_minutes(T0 + 600, 3)]


async def test_a_batch_is_committed_with_its_hole_records_and_published(tmp_path: Path) -> None:
    hole = (T0, T0 + 600)
    async with committer(tmp_path) as rig:
        assert await rig.committer.commit(items((hole,))) == 3
        assert rig.hub.closed_times(str(BTC)) == [T0 + 600, T0 + 660, T0 + 720]
        key = f"unresolved_holes:{BTC}"
        assert orjson.loads(await rig.store.get_meta(key) or "null") == [list(hole)]
        # the record is written once; saving the same holes again writes nothing new
        await rig.committer.save_holes(BTC, (hole,))
        await rig.committer.save_holes(BTC, ())
        assert await rig.store.get_meta(key) == "[]"


async def test_a_batch_is_published_in_one_corked_block_of_the_sink(tmp_path: Path) -> None:
    """Every message of a committed batch (its closes and the derived bar they complete) is
    published inside one ``corked`` block: the Hub writes each subscriber's share once."""
    async with committer(tmp_path) as rig:
        five = [BatchItem(BTC, Released(c, "ws"), 0.0) for c in flat_minutes(T0 + 600, 5)]
        assert await rig.committer.commit(five) == 6  # with the 5m bar they complete
        closed = [m for m in rig.hub.messages if m["type"] == "candles_batch"]
        assert {m["series_id"] for m in closed} == {str(BTC), BTC5}
        assert rig.hub.corks == [(0, len(rig.hub.messages))]


async def test_a_refused_batch_is_committed_candle_by_candle(tmp_path: Path) -> None:
    async with committer(tmp_path) as rig:
        batch = items()
        bad = attrs.evolve(bar(T0 + 660), high=Decimal(0))  # high below low
        batch[1] = attrs.evolve(batch[1], released=Released(bad, "ws"))
        assert await rig.committer.commit(batch) == 2
        stored = await rig.store.range(str(BTC), 0, 2**40)
        assert [s.candle.candle_time for s in stored] == [T0 + 600, T0 + 720]
        assert [(m.reason, m.first) for m in rig.reported] == [("bad_candle", True)]


async def test_held_forming_candles_follow_the_publish_of_what_they_waited_for(
    tmp_path: Path,
) -> None:
    """The core holds the next bar's forming candle while the close before it waits for its
    commit; the committer releases it only after publishing that close."""
    async with committer(tmp_path, head=T0 - 60) as rig:
        first, second = bar(T0), bar(T0 + 60)
        rig.core.on_frame(close_of(BTC, first), generation=1, received_at=0.0, now=0.0)
        outcome = rig.core.on_frame(forming_of(BTC, second), generation=1, received_at=0, now=0)
        assert outcome.forming == ()  # held: T0's close is not committed yet
        batch = rig.core.take_batch()
        assert batch is not None
        assert await rig.committer.commit(batch.items) == 1
        kinds = [(m["type"], m["series_id"]) for m in rig.hub.messages]
        assert kinds == [
            ("candles_batch", str(BTC)),
            ("system", str(BTC)),  # new_series
            ("candle_forming", str(BTC)),
            ("candle_forming", BTC5),
        ]
        assert rig.hub.of_type("candle_forming")[0]["candle"]["candle_time"] == T0 + 60


async def test_absent_runs_are_committed_as_gap_events_and_finalise_derived_buckets(
    tmp_path: Path,
) -> None:
    """A run confirmed absent commits on its own (no candle above it yet): a gap for the
    base series, and the 5m bucket it ends is stored incomplete with its own gap."""
    async with committer(tmp_path) as rig:
        await rig.committer.commit(items()[:2])  # T0+600, T0+660; the bucket ends at T0+840
        absent = BatchItem(BTC, None, 0.0, (), (T0 + 720, T0 + 900))
        assert await rig.committer.commit([absent]) == 1
        (stored,) = await rig.store.range(BTC5, T0 + 600, T0 + 900)
        assert not stored.complete
        gaps = [
            (m["data"]["series_id"], m["data"]["reason"], m["data"]["from_time"])
            for m in rig.hub.of_type("system")
            if m["event"] == "gap"
        ]
        assert gaps == [(str(BTC), "exchange", T0 + 720), (BTC5, "incomplete", T0 + 600)]
        assert rig.hub.closed_times(BTC5) == [T0 + 600]


async def test_flushes_are_logged_at_debug_and_summed_up_at_info_once_a_minute(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Each flush's line is DEBUG; the first flush a minute after the first writes one INFO
    line with the totals of the three (the clock moves only when the test jumps it)."""
    caplog.set_level(logging.DEBUG, logger="tradecanvas.ingest.committer")
    async with committer(tmp_path) as rig:
        committed = [await rig.committer.commit(items())]  # T0+600..T0+720, new
        mock_clock.jump(30)
        # the same again, one of them twice: a duplicate in the batch, nothing new
        committed.append(await rig.committer.commit([*items(), *items()[:1]]))
        mock_clock.jump(31)
        # T0+780, T0+840: the 5m bucket from T0+600 is complete, its bar is committed too
        last = [BatchItem(BTC, Released(c, "ws"), 0.0) for c in flat_minutes(T0 + 780, 2)]
        committed.append(await rig.committer.commit(last))
    assert committed == [3, 0, 3]
    records = [r for r in caplog.records if r.name == "tradecanvas.ingest.committer"]
    per_flush = [r for r in records if r.getMessage().startswith("test: flush ")]
    assert [r.levelno for r in per_flush] == [logging.DEBUG] * 3
    assert [r.args[1:5] for r in per_flush if isinstance(r.args, tuple)] == [
        (3, 3, 0, 1),  # received, committed, duplicates, events (1m: new_series)
        (4, 0, 1, 0),
        (2, 3, 0, 1),  # the two closes and the 5m bar (5m: new_series)
    ]
    (summary,) = [r for r in records if r.levelno == logging.INFO]
    assert summary.getMessage() == (
        "test: 3 flushes in the last 61 s: 9 received, 6 committed, 1 duplicates, 2 events;"
        " commit p50 0.0 ms max 0.0 ms, publish p50 0.0 ms max 0.0 ms (legacy)"
    )
