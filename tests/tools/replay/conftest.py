"""The replay's test data: Binance's futures BTCUSDT day (CSV) and a recorded JSONL capture."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import attrs
import pytest
import trio_websocket

from tradecanvas.model import Candle
from tradecanvas.tools.replay import ReplayConfig, parse_file_argument
from tradecanvas.wire.binance import KlineEvent, decode_frame
from tradecanvas.wire.kline_csv import read_kline_csv

DAY: Final = 1_692_144_000  # 2023-08-16 00:00 UTC, the futures day file
STREAM: Final = "btcusdt@kline_1m"


@pytest.fixture
def day_csv(data_dir: Path) -> Path:
    return data_dir / "klines_1m_5m" / "futures_um" / "BTCUSDT-1m-2023-08-16.csv"


@pytest.fixture
def day_rows(day_csv: Path) -> list[Candle]:
    return read_kline_csv(day_csv)


@pytest.fixture
def frames_jsonl(data_dir: Path) -> Path:
    return data_dir / "ws" / "futures_um" / "kline_1m_frames_2021-07-22T22-25Z.jsonl"


def config_for(path: Path, **changes: Any) -> ReplayConfig:
    """One file, ``--speed max``, with ``changes``."""
    config = ReplayConfig(files=(parse_file_argument(str(path), None),), speed=None)
    return attrs.evolve(config, **changes)


async def read_events(ws: trio_websocket.WebSocketConnection, count: int) -> list[KlineEvent]:
    """The next ``count`` frames, each a kline."""
    events: list[KlineEvent] = []
    for _ in range(count):
        decoded = decode_frame(await ws.get_message())
        assert isinstance(decoded, KlineEvent)
        events.append(decoded)
    return events
