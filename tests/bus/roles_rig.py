"""What the role tests share: the real-data source, the comparison with Binance's bars, and
starting ``tradecanvas replay`` and the roles. Their recording /ws/market client is
:class:`tests.recording_subscriber.Subscriber`."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import trio

from tests.cli_rig import wait_for_line
from tests.conftest import binance_data_dir
from tradecanvas.model import Candle
from tradecanvas.wire.kline_csv import read_kline_csv

BASE: Final = "binance:futures:BTC/USDT:1m"
FIVE: Final = "binance:futures:BTC/USDT:5m"
FOLDER: Final = "klines_1m_5m/futures_um"
HISTORY_BARS: Final = 60  # served on REST only: the ingest's initial backfill
BARS: Final = 300  # 60 history + 240 streamed: 60 closed 5m bars
TOKEN: Final = "roles-test-token-0123456789"
# bounds every wait: a hang fails, it does not stall CI
WAIT_S: Final = 120.0
OBJ = dict[str, Any]


def same(wire: list[OBJ], ref: list[Candle]) -> bool:
    fields = ("open", "high", "low", "close", "volume")
    return [c["candle_time"] for c in wire] == [r.candle_time for r in ref] and all(
        all(w[f] == float(getattr(r, f)) for f in fields) for w, r in zip(wire, ref, strict=True)
    )


READY: Final = r"tradecanvas ready ws=(\S+) http=(\S+)"


@attrs.frozen
class Source:
    """The replay's input: ``bars`` 1m bars of a real week and Binance's 5m bars of them."""

    csv: Path
    minutes: list[Candle]
    fives: list[Candle]


def source(tmp_path: Path, bars: int = BARS) -> Source:
    folder = binance_data_dir() / FOLDER
    week = (folder / "BTCUSDT-1m-2025-07-06_2025-07-12.csv").read_text().splitlines()
    csv = tmp_path / "BTCUSDT-1m-2025-07-06.csv"
    csv.write_text("\n".join(week[: bars + 1]) + "\n")  # the header and the bars
    minutes = read_kline_csv(csv)
    fives = read_kline_csv(folder / "BTCUSDT-5m-2025-07-06_2025-07-12.csv")[: bars // 5]
    assert len(minutes) == bars and fives[-1].candle_time == minutes[-5].candle_time
    return Source(csv, minutes, fives)


async def replay_urls(log: Path, replay: subprocess.Popen[bytes]) -> tuple[str, str]:
    found = await wait_for_line(log, r"replay ws=(\S+) rest=(\S+)", replay)
    return found.group(1), found.group(2)


async def ready(log: Path, proc: subprocess.Popen[bytes]) -> tuple[str, str]:
    """A role's (ws, http) once it logged that it is ready."""
    found = await wait_for_line(log, READY, proc)
    return found.group(1), found.group(2)


async def metrics_text(http: str) -> str:
    async with httpx.AsyncClient(base_url=http) as client:
        return (await client.get("/metrics")).text


def metric(text: str, name: str) -> float | None:
    found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    return None if found is None else float(found.group(1))


async def readyz(http: str) -> tuple[int, OBJ]:
    async with httpx.AsyncClient(base_url=http) as client:
        answer = await client.get("/readyz")
    doc = answer.json()
    assert isinstance(doc, dict)
    return answer.status_code, doc


async def wait_for(condition: Callable[[], Any], what: str, *, within: float = WAIT_S) -> None:
    """Poll ``condition`` (an awaitable factory or a plain callable) until true."""
    with trio.fail_after(within):
        while True:
            got = condition()
            if hasattr(got, "__await__"):
                got = await got
            if got:
                return
            await trio.sleep(0.05)
