"""Shared by the import tests: the real archive files, a store's rows, an import in this
process (the pipeline as ``serve`` builds it)."""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from tests.conftest import binance_data_dir
from tradecanvas.errors import ExitCode
from tradecanvas.model import Candle, SeriesId
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.store.interface import MarketStore
from tradecanvas.store.open import open_store
from tradecanvas.store.types import StoredEvent
from tradecanvas.tools.importer import ImportFile, ImportTally, run_import
from tradecanvas.tools.importer.files import find_files, plan_file
from tradecanvas.tools.progress import Progress

SPOT_1M: Final = "binance:spot:BTC/USDT:1m"
SPOT_5M: Final = "binance:spot:BTC/USDT:5m"
DUMP: Final = Path("klines_1m_daily_dump") / "spot"
DAYS: Final = ("2020-01-01", "2020-01-02", "2020-01-03")
FLAGS: Final = build_runtime_flags({}).flags


def dump_dir() -> Path:
    return binance_data_dir() / DUMP


def real_zips() -> list[Path]:
    return [dump_dir() / f"BTCUSDT-1m-{day}.zip" for day in DAYS]


def plan(paths: Sequence[Path], series: str | None = None) -> list[ImportFile]:
    given = SeriesId.parse(series) if series else None
    return [plan_file(p, given, None) for p in find_files(paths)]


async def import_into(
    location: str | Path, files: Sequence[ImportFile], *, batch: int = 100_000
) -> tuple[ExitCode, ImportTally, str | None]:
    progress = Progress(io.StringIO(), log=logging.getLogger("test"), verb="import", tty=False)
    return await run_import(
        files,
        location,
        FLAGS.derived_timeframes,
        FLAGS.derivation_fingerprint(),
        progress,
        batch=batch,
    )


async def rows(location: str | Path, series: str) -> list[Candle]:
    store = await open_store(location)
    try:
        return [s.candle for s in await store.range(series, 0, 2**40)]
    finally:
        await store.aclose()


async def events(location: str | Path) -> list[StoredEvent]:
    store: MarketStore = await open_store(location)
    try:
        return await store.events_after(0, None, 10_000)
    finally:
        await store.aclose()


def identical(a: Sequence[Candle], b: Sequence[Candle]) -> bool:
    """Every field, extras included, numerically equal, in the same order."""
    return len(a) == len(b) and all(x == y for x, y in zip(a, b, strict=True))


class Nobody:
    """The pipeline's publish target in these tests: no subscriber."""

    def publish_closed(self, series_id: str, candles: object) -> tuple[str, ...]:
        return ()

    def publish_system(self, event: object) -> tuple[str, ...]:
        return ()
