"""Shared test helpers: where the real Binance data lives, and small builders."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from tradecanvas.model import Candle
from tradecanvas.runtime_flags import binance_data_dir as find_data_dir
from tradecanvas.wire.kline_csv import read_kline_csv

__all__ = ["read_kline_csv"]

REPO = Path(__file__).resolve().parent.parent


def binance_data_dir() -> Path:
    """Real Binance data (``runtime_flags.binance_data_dir``). Missing data is an error,
    never a skip."""
    found = find_data_dir()
    if found is None:
        raise RuntimeError(
            "no Binance test data: set TRADE_CANVAS_DATA_DIR, put ../shared/data/binance beside"
            " the checkout, or run `make test-data`"
        )
    return found


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return binance_data_dir()


def candle(t: int, o: str, h: str, lo: str, c: str, v: str = "1") -> Candle:
    return Candle(t, Decimal(o), Decimal(h), Decimal(lo), Decimal(c), Decimal(v))


def flat_minutes(start: int, count: int, price: str = "100") -> Iterator[Candle]:
    for i in range(count):
        yield candle(start + 60 * i, price, price, price, price, "1")
