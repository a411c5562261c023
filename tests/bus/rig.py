"""What the bus tests share: a sink that records what an edge's Hub would get, the store
reads an edge fills holes with, a committed history to publish, and a running publisher with
its pipeline to publish it through."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import attrs
import trio

from tests.conftest import candle
from tradecanvas.bus.feed import EdgeFeed, FeedSettings
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.publisher import BusPublisher, PublisherSettings
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.pipeline.publish import PublishTarget
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.sqlite import CandleStore

BTC: Final = SeriesId.parse("binance:futures:BTC/USDT:1m")
BTC1: Final = str(BTC)
BTC5: Final = "binance:futures:BTC/USDT:5m"
T0: Final = 1_751_760_000  # a 5m boundary
# bounds every wait of these tests: a hang fails, it does not stall CI
WAIT_S: Final = 30.0


def minutes(start: int, count: int) -> list[Candle]:
    """``count`` distinct 1m bars from ``start`` (prices vary, so a mix-up shows)."""
    out = []
    for i in range(count):
        p = str(100 + (start // 60 + i) % 50)
        out.append(candle(start + 60 * i, p, str(int(p) + 1), str(int(p) - 1), p, str(i % 7 + 1)))
    return out


class RecordingSink:
    """The Hub as the feed sees it: records every publish, in order; ``followed``: the
    series it has subscribers for (None: every series)."""

    def __init__(self, followed: set[str] | None = None) -> None:
        self.followed = followed
        self.log: list[tuple[str, str, object]] = []
        self.closed: dict[str, list[Candle]] = {}
        self.events: list[SystemEvent] = []
        self.forming: list[tuple[str, Candle]] = []
        # corked blocks (Hub.corked): the publishes of each; held while one is open
        self.blocks: list[list[tuple[str, str, object]]] = []
        self.held = False
        # store reads an edge_feed(corks=this sink) made while a cork was held
        self.reads_while_held = 0
        self._changed = trio.Event()

    def _note(self) -> None:
        if self.held:
            self.blocks[-1].append(self.log[-1])
        self._changed.set()
        self._changed = trio.Event()

    def follows(self, series_id: str) -> bool:
        return self.followed is None or series_id in self.followed

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        self.closed.setdefault(series_id, []).extend(candles)
        self.log.append(("closed", series_id, [c.candle_time for c in candles]))
        self._note()
        return ()

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        self.events.append(event)
        self.log.append(("system", event.series_id, event.event_id))
        self._note()
        return ()

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        self.forming.append((series_id, candle))
        self.log.append(("forming", series_id, candle.candle_time))
        self._note()

    def corked(self) -> contextlib.AbstractContextManager[None]:
        return self._corked()

    @contextlib.contextmanager
    def _corked(self) -> Iterator[None]:
        assert not self.held, "a feed never nests corks"
        self.held = True
        self.blocks.append([])
        try:
            yield
        finally:
            self.held = False

    def times(self, series_id: str) -> list[int]:
        return [c.candle_time for c in self.closed.get(series_id, [])]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(WAIT_S):
            while not condition():
                await self._changed.wait()


async def open_pipeline(tmp_path: Path, target: PublishTarget) -> IngestPipeline:
    store = await CandleStore.open(tmp_path / "bus.sqlite3")
    return IngestPipeline(store, target, [Timeframe.parse("5m")], "fp")


async def run_closed(publisher: BusPublisher) -> None:
    """Close ``publisher`` and run it to its end: what was queued before goes out first
    (drain by closing)."""
    publisher.close()
    with trio.fail_after(WAIT_S):
        await publisher.run()


async def commit_and_publish(pipeline: IngestPipeline, candles: Sequence[Candle]) -> None:
    result = await pipeline.run(IngestBatch.of(BTC, candles, "ws"))
    pipeline.publish(result, best_effort=True)


def edge_feed(
    url: str,
    store: MarketStore,
    keys: StreamKeys,
    *,
    series: dict[str, int | None],
    events_after: int = 0,
    settings: FeedSettings | None = None,
    corks: RecordingSink | None = None,
) -> EdgeFeed:
    """A feed whose holes are filled from ``store``, in small pages (a page may be short);
    ``corks``: counts the reads made while that sink held a cork."""

    async def fill_candles(series_id: str, after: int | None, before: int | None) -> list[Candle]:
        if corks is not None:
            corks.reads_while_held += corks.held
        got = await store.since(series_id, -1 if after is None else after, 7)
        return [c for c in got if before is None or c.candle_time < before]

    async def fill_events(after: int, before: int | None) -> list[SystemEvent]:
        got = await store.events_after(after, limit=3)
        return [SystemEvent.from_stored(e) for e in got if before is None or e.event_id < before]

    return EdgeFeed(
        url,
        series=series,
        events_after=events_after,
        fill_candles=fill_candles,
        fill_events=fill_events,
        settings=settings or FeedSettings(keys=keys, block_ms=200),
    )


@attrs.frozen
class Publishing:
    """A running :class:`BusPublisher`, a pipeline on a fresh SQLite store that publishes
    through it, and the nursery they run in (:func:`publishing`)."""

    publisher: BusPublisher
    pipeline: IngestPipeline
    nursery: trio.Nursery

    async def start_feed(
        self,
        url: str,
        keys: StreamKeys,
        sink: RecordingSink,
        *,
        series: dict[str, int | None],
        settings: FeedSettings | None = None,
    ) -> EdgeFeed:
        """An :func:`edge_feed` filling holes from the pipeline's store, once it is ready
        (counting the reads made while ``sink`` held a cork)."""
        feed = edge_feed(
            url, self.pipeline.store, keys, series=series, settings=settings, corks=sink
        )
        await self.nursery.start(feed.run, sink)
        await feed.wait_ready()
        return feed


@contextlib.asynccontextmanager
async def publishing(
    url: str, tmp_path: Path, settings: PublisherSettings
) -> AsyncIterator[Publishing]:
    """The publisher runs while the body does and is cancelled after it (with any feed
    started in the nursery); the store is closed on the way out."""
    publisher = BusPublisher(url, settings)
    pipeline = await open_pipeline(tmp_path, publisher)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(publisher.run)
            yield Publishing(publisher, pipeline, nursery)
            nursery.cancel_scope.cancel()
    finally:
        await pipeline.store.aclose()


async def stored(store: MarketStore, series_id: str) -> list[Candle]:
    return await store.since(series_id, -1, 100_000)


async def stored_events(store: MarketStore) -> list[int]:
    return [e.event_id for e in await store.events_after(0, limit=100_000)]
