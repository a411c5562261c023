"""Learning a symbol's 3d grid phase: from Binance, else the store, else the known table."""

from __future__ import annotations

from pathlib import Path

import pytest

from tradecanvas.errors import UpstreamError
from tradecanvas.model import DAY, SeriesId, Timeframe
from tradecanvas.store.sqlite import CandleStore
from tradecanvas.upstream.phases import learn_phase

THREE_DAYS = Timeframe.parse("3d")
SPOT_BTC = SeriesId.parse("binance:spot:BTC/USDT:1m")
SPOT_XRP = SeriesId.parse("binance:spot:XRP/USDT:1m")


class FakeBinance:
    """Binance's answer to ``klines?interval=3d&limit=1``: an open time, or a failure."""

    def __init__(self, open_time: int | None = None, fail: bool = False) -> None:
        self.open_time = open_time
        self.fail = fail
        self.asked: list[str] = []

    async def latest_open_time(self, series: SeriesId) -> int | None:
        self.asked.append(str(series))
        if self.fail:
            raise UpstreamError("GET /api/v3/klines: timed out")
        return self.open_time


async def test_the_phase_comes_from_binance_and_is_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await CandleStore.open(tmp_path / "p.sqlite3")
    try:
        # spot BTCUSDT opened a 3d bar on 2024-11-30 (days since epoch mod 3 == 1)
        binance = FakeBinance(open_time=20057 * DAY)
        with caplog.at_level("INFO"):
            assert await learn_phase(SPOT_XRP, THREE_DAYS, binance, store) == 20057 % 3 * DAY
        assert binance.asked == ["binance:spot:XRP/USDT:3d"]
        assert "from Binance" in caplog.text
        # Binance unreachable after a restart: the stored phase is used, and the log says so
        caplog.clear()
        with caplog.at_level("INFO"):
            assert await learn_phase(SPOT_XRP, THREE_DAYS, FakeBinance(fail=True), store) == (
                20057 % 3 * DAY
            )
        assert "from the store" in caplog.text
    finally:
        await store.aclose()


async def test_without_binance_or_a_stored_phase_the_table_or_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = await CandleStore.open(tmp_path / "p.sqlite3")
    try:
        with caplog.at_level("WARNING"):
            assert await learn_phase(SPOT_BTC, THREE_DAYS, FakeBinance(fail=True), store) == DAY
            assert await learn_phase(SPOT_XRP, THREE_DAYS, FakeBinance(fail=True), store) is None
        assert "built-in table" in caplog.text
        assert "not derived until Binance answers" in caplog.text
    finally:
        await store.aclose()
