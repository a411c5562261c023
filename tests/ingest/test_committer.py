"""BatchCommitter against a real SQLite store and IngestPipeline (no sockets)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path

import attrs
import orjson

from tests.conftest import flat_minutes
from tests.ingest.rig import RecordingHub
from tradecanvas.ingest.batcher import BatchItem
from tradecanvas.ingest.committer import BatchCommitter
from tradecanvas.ingest.core import IngestCore, Malformed
from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.tracker import Released
from tradecanvas.model import SeriesId, Timeframe
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.store.sqlite import CandleStore

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
T0 = 1_751_760_000


@attrs.define
class Rig:
    committer: BatchCommitter
    store: CandleStore
    hub: RecordingHub
    reported: list[Malformed]


@asynccontextmanager
async def committer(tmp_path: Path) -> AsyncIterator[Rig]:
    flags = build_runtime_flags({}).flags
    core = IngestCore([BTC], flags=flags, policy=IngestPolicy())
    core.load_series(BTC, head=None, unresolved=(), recent=())
    store = await CandleStore.open(tmp_path / "market.sqlite3")
    hub = RecordingHub()
    reported: list[Malformed] = []
    try:
        yield Rig(
            BatchCommitter(
                core,
                pipeline=IngestPipeline(store, hub, (Timeframe.parse("5m"),), "fp"),
                hub=hub,
                metrics=Metrics(),
                enable_pipeline_publish=False,
                report_malformed=reported.append,
                name="test",
            ),
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


async def test_a_refused_batch_is_committed_candle_by_candle(tmp_path: Path) -> None:
    async with committer(tmp_path) as rig:
        batch = items()
        bad = attrs.evolve(batch[1].released.candle, high=Decimal(0))  # high below low
        batch[1] = attrs.evolve(batch[1], released=Released(bad, "ws"))
        assert await rig.committer.commit(batch) == 2
        stored = await rig.store.range(str(BTC), 0, 2**40)
        assert [s.candle.candle_time for s in stored] == [T0 + 600, T0 + 720]
        assert [(m.reason, m.first) for m in rig.reported] == [("bad_candle", True)]
