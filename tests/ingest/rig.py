"""The socket-level ingest rig: replay or a scripted upstream, IngestSupervisor, the REST
client, SQLite in tmp_path and IngestPipeline, all real; the Hub is stood in for by
RecordingHub, a minimal MarketSink that records what subscribers would be sent.

Shared by test_loop.py and test_supervisor.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from tradecanvas.ingest.policy import IngestPolicy
from tradecanvas.ingest.supervisor import IngestSupervisor
from tradecanvas.model import Candle, SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.runtime_flags import RuntimeFlags, build_runtime_flags
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.tools.replay import ReplayConfig, ReplayHandle, parse_file_argument, serve_replay
from tradecanvas.upstream.plan import ConnectionPolicy
from tradecanvas.upstream.rest import RestPolicy
from tradecanvas.wire.binance import kline_frame
from tradecanvas.wire.json import dumps
from tradecanvas.wire.kline_csv import read_kline_csv

BTC = SeriesId.parse("binance:futures:BTC/USDT:1m")
BTC_5M = "binance:futures:BTC/USDT:5m"
DAY = 1_692_144_000  # 2023-08-16, the futures day file
WEEK = 1_751_760_000  # 2025-07-06, the 7-day futures files
# quick reconnects and restarts, so that real-time tests stay short
FAST = IngestPolicy(
    connection=ConnectionPolicy(reconnect_base_s=0.02, min_connect_interval_s=0.02),
    restart_base_s=0.02,
    fill_retry_base_s=0.02,
    fill_retry_cap_s=0.1,
)
WAIT_S = 60  # an upper bound on any wait here; a hang fails instead of blocking


class RecordingHub:
    """A minimal MarketSink that records the messages subscribers would get.

    ``fail_closed_for`` makes ``publish_closed`` raise for those series (a broken sink).
    """

    def __init__(
        self, fail_closed_for: Sequence[str] = (), timeout_s: float | None = WAIT_S
    ) -> None:
        self.timeout_s = timeout_s
        self.messages: list[dict[str, Any]] = []
        self.times: list[float] = []  # trio.current_time() of each message
        self.fail_closed_for = set(fail_closed_for)
        # each corked block's messages: (index of its first, index after its last)
        self.corks: list[tuple[int, int]] = []
        self._changed = trio.Event()

    def _record(self, message: dict[str, Any]) -> None:
        self.messages.append(message)
        self.times.append(trio.current_time())
        self._changed.set()
        self._changed = trio.Event()

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        if series_id in self.fail_closed_for:
            self._changed.set()
            raise RuntimeError(f"subscriber socket of {series_id} broke")
        wire = [c.to_wire() for c in candles]
        self._record({"type": "candles_batch", "series_id": series_id, "candles": wire})
        return []

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        self._record(event.to_wire())
        return []

    def publish_forming(self, series_id: str, candle: Candle) -> None:
        self._record({"type": "candle_forming", "series_id": series_id, "candle": candle.to_wire()})

    @contextlib.contextmanager
    def corked(self) -> Iterator[None]:
        first = len(self.messages)
        yield
        self.corks.append((first, len(self.messages)))

    def closed_times(self, series_id: str) -> list[int]:
        return [
            c["candle_time"]
            for m in self.messages
            if m["type"] == "candles_batch" and m["series_id"] == series_id
            for c in m["candles"]
        ]

    def overtaken(self) -> list[tuple[int, int, str]]:
        """Per series, every closed candle recorded after a forming candle of a later bar,
        as (forming time, closed time, series_id): a charting client would drop it, so this
        must stay empty (DESIGN §10; the same check as tests/ingest/driver.overtaken)."""
        newest: dict[str, int] = {}
        found: list[tuple[int, int, str]] = []
        for m in self.messages:
            sid = m.get("series_id", "")
            if m["type"] == "candle_forming":
                newest[sid] = max(
                    newest.get(sid, m["candle"]["candle_time"]), m["candle"]["candle_time"]
                )
            elif m["type"] == "candles_batch":
                found += [
                    (newest[sid], c["candle_time"], sid)
                    for c in m["candles"]
                    if sid in newest and c["candle_time"] < newest[sid]
                ]
        return found

    def chart(self, series_id: str) -> dict[int, dict[str, Any]]:
        """The bars a charting client following ``series_id`` ends with when it merges
        what it was sent the common way: keep the newest bar, let a forming or closed
        candle replace a bar at or after it, and drop any candle older than the newest."""
        bars: dict[int, dict[str, Any]] = {}
        for m in self.messages:
            if m.get("series_id") != series_id or m["type"] not in (
                "candles_batch",
                "candle_forming",
            ):
                continue
            for candle in m.get("candles", [m.get("candle")]):
                t = candle["candle_time"]
                if not bars or t >= max(bars):
                    bars[t] = candle
        return bars

    def of_type(self, kind: str, series_id: str | None = None) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages
            if m["type"] == kind and (series_id is None or m["series_id"] == series_id)
        ]

    async def wait_for(self, condition: Callable[[], bool]) -> None:
        with trio.fail_after(self.timeout_s) if self.timeout_s else contextlib.nullcontext():
            while not condition():
                await self._changed.wait()

    async def wait_closed(self, series_id: str, t: int) -> None:
        await self.wait_for(lambda: t in self.closed_times(series_id))


def make_flags(tmp_path: Path, ws_url: str, rest_url: str, **env: str) -> RuntimeFlags:
    environ = {
        "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": ws_url,
        "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": rest_url,
        "TRADE_CANVAS_BINANCE_SPOT_WS_URL": ws_url,
        "TRADE_CANVAS_BINANCE_SPOT_REST_URL": rest_url,
        "TRADE_CANVAS_DB_PATH": str(tmp_path / "market.sqlite3"),
        "TRADE_CANVAS_INITIAL_BACKFILL_CANDLES": "0",
        "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m",
        # quick flushes, so that real-time tests stay short (tests of batching set their own)
        "TRADE_CANVAS_BINANCE_WS_FLUSH_S": "0.05",
    }
    environ.update({f"TRADE_CANVAS_{k.upper()}": v for k, v in env.items()})
    return build_runtime_flags(environ).flags


@attrs.define
class Rig:
    hub: RecordingHub
    store: CandleStore
    pipeline: IngestPipeline
    supervisor: IngestSupervisor
    metrics: Metrics
    flags: RuntimeFlags
    replay: ReplayHandle | None = None
    ingest_scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    ingest_done: trio.Event = attrs.Factory(trio.Event)

    async def stop_ingest(self) -> None:
        self.ingest_scope.cancel()
        await self.ingest_done.wait()

    async def stored(self, series_id: str) -> list[Candle]:
        return [s.candle for s in await self.store.range(series_id, 0, 2**40)]

    def publish_count(self, path: str) -> float:
        value = self.metrics.registry.get_sample_value("tradecanvas_publish_total", {"path": path})
        return value or 0.0


@contextlib.asynccontextmanager
async def ingest_rig(
    tmp_path: Path,
    *,
    replay: ReplayConfig | None = None,
    ws_url: str = "",
    rest_url: str = "",
    hub: RecordingHub | None = None,
    enable_pipeline_publish: bool = False,
    policy: IngestPolicy = FAST,
    rest_policy: RestPolicy | None = None,
    **env: str,
) -> AsyncIterator[Rig]:
    """Replay (unless URLs are given) + IngestSupervisor + real store and pipeline."""
    hub = hub or RecordingHub()
    async with trio.open_nursery() as nursery:
        handle: ReplayHandle | None = None
        if replay is not None:
            handle = await nursery.start(serve_replay, replay)
            ws_url, rest_url = ws_url or handle.ws_url, rest_url or handle.rest_url
        flags = make_flags(tmp_path, ws_url, rest_url, **env)
        store = await CandleStore.open(flags.db_path)
        pipeline = IngestPipeline(store, hub, flags.derived_timeframes, "test-fingerprint")
        metrics = Metrics()
        supervisor = IngestSupervisor(
            flags,
            pipeline,
            hub,
            metrics,
            enable_pipeline_publish=enable_pipeline_publish,
            policy=policy,
            rest_policy=rest_policy,
        )
        rig = Rig(hub, store, pipeline, supervisor, metrics, flags, handle)

        async def run_ingest(*, task_status: trio.TaskStatus[None]) -> None:
            try:
                with rig.ingest_scope:
                    await supervisor.run(task_status=task_status)
            finally:
                rig.ingest_done.set()

        try:
            await nursery.start(run_ingest)
            yield rig
        finally:
            with trio.CancelScope(shield=True, deadline=trio.current_time() + WAIT_S):
                await rig.stop_ingest()
                await store.aclose()
        nursery.cancel_scope.cancel()


def reconnect_counts(rig: Rig) -> dict[str, float]:
    """tradecanvas_upstream_reconnects_total by reason, without the zeros."""
    counts = {}
    for metric in rig.metrics.registry.collect():
        for sample in metric.samples:
            if sample.name == "tradecanvas_upstream_reconnects_total" and sample.value:
                counts[sample.labels["reason"]] = sample.value
    return counts


def day_replay(data_dir: Path, **changes: Any) -> ReplayConfig:
    path = data_dir / "klines_1m_5m" / "futures_um" / "BTCUSDT-1m-2023-08-16.csv"
    config = ReplayConfig(files=(parse_file_argument(str(path), None),), speed=None)
    return attrs.evolve(config, **changes)


def day_rows(data_dir: Path) -> list[Candle]:
    return read_kline_csv(data_dir / "klines_1m_5m" / "futures_um" / "BTCUSDT-1m-2023-08-16.csv")


def same_bars(got: Sequence[Candle], expected: Sequence[Candle]) -> bool:
    """Same open times and values; fields one side lacks (OHLCV-only CSVs) are not compared."""
    return len(got) == len(expected) and all(
        a.same_values(b) for a, b in zip(got, expected, strict=True)
    )


def assert_contiguous(times: Sequence[int], first: int, last: int, step: int = 60) -> None:
    assert times == list(range(first, last + step, step)), "a hole, a repeat or disorder"


# --- streams and URLs ----------------------------------------------------------------


def frame(candle: Candle, *, closed: bool, event_time_ms: int) -> str:
    return dumps(kline_frame(BTC, candle, closed=closed, event_time_ms=event_time_ms))


def metric(rig: Rig, name: str, **labels: str) -> float:
    """A sample of the rig's metrics (0 when never set)."""
    return rig.metrics.registry.get_sample_value(name, labels) or 0.0


def malformed_total(rig: Rig) -> float:
    """tradecanvas_malformed_frames_total over every reason."""
    return sum(
        sample.value
        for family in rig.metrics.registry.collect()
        for sample in family.samples
        if sample.name == "tradecanvas_malformed_frames_total"
    )
