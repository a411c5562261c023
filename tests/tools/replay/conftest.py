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


def faults_config(path: Path, **changes: Any) -> ReplayConfig:
    """:func:`config_for` with the WS faults both the core's and the server's fault tests
    check: from bar 1420, one forming frame a bar, bar 1421's close omitted, 1422's sent
    twice, every connection dropped before 1424's close and the 2 bars after it skipped."""
    return config_for(
        path,
        start_at=1420,
        forming_per_bar=1,
        omit_closes=frozenset({1421}),
        duplicate_closes=frozenset({1422}),
        drop_at=(1424,),
        skip=2,
        **changes,
    )


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
