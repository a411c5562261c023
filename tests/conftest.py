"""Shared test helpers: where the real Binance data lives, and small builders."""

from __future__ import annotations

from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import pytest

from tradecanvas.model import Candle
from tradecanvas.wire.binance import read_kline_csv

__all__ = ["read_kline_csv"]

REPO = Path(__file__).resolve().parent.parent


def binance_data_dir() -> Path:
    """``$TRADECANVAS_DATA_DIR``, else ``../shared/data/binance`` beside the checkout, else
    ``.cache/binance`` (``make test-data``). Missing data is an error, never a skip."""
    import os

    explicit = os.environ.get("TRADECANVAS_DATA_DIR")
    candidates = [Path(explicit)] if explicit else []
    candidates += [REPO.parent / "shared" / "data" / "binance", REPO / ".cache" / "binance"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    raise RuntimeError(
        "no Binance test data: set TRADECANVAS_DATA_DIR, put ../shared/data/binance beside"
        " the checkout, or run `make test-data`"
    )


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return binance_data_dir()


def candle(t: int, o: str, h: str, lo: str, c: str, v: str = "1") -> Candle:
    return Candle(t, Decimal(o), Decimal(h), Decimal(lo), Decimal(c), Decimal(v))


def flat_minutes(start: int, count: int, price: str = "100") -> Iterator[Candle]:
    for i in range(count):
        yield candle(start + 60 * i, price, price, price, price, "1")
