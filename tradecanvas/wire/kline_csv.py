"""Kline CSV files: Binance's public archive layout (12 columns, no header) and the
``open_time,open,high,low,close,volume`` layout with a header (DESIGN §8)."""

from __future__ import annotations

import csv
from decimal import Decimal, InvalidOperation
from pathlib import Path

from tradecanvas.errors import WireError
from tradecanvas.model import MS, Candle


def read_kline_csv(path: Path) -> list[Candle]:
    """Read a kline CSV in either layout Binance data comes in: a header
    ``open_time,open,high,low,close,volume`` (ms), or the 12-column data.binance.vision dump
    without a header. Raises WireError naming the line of a bad row."""
    rows: list[Candle] = []
    with path.open(newline="") as f:
        for number, row in enumerate(csv.reader(f), start=1):
            if not row or (number == 1 and not row[0].strip().isdigit()):
                continue
            try:
                open_ms = int(row[0])
                open_ms = open_ms // MS if open_ms > 10**15 else open_ms  # µs dumps (2025+)
                extras = len(row) >= 11
                rows.append(
                    Candle(
                        candle_time=open_ms // MS,
                        open=Decimal(row[1]),
                        high=Decimal(row[2]),
                        low=Decimal(row[3]),
                        close=Decimal(row[4]),
                        volume=Decimal(row[5]),
                        quote_volume=Decimal(row[7]) if extras else None,
                        trades=int(row[8]) if extras else None,
                        taker_buy_base=Decimal(row[9]) if extras else None,
                        taker_buy_quote=Decimal(row[10]) if extras else None,
                    )
                )
            except (ValueError, IndexError, InvalidOperation) as exc:
                raise WireError("bad_csv_row", f"{path}:{number}: {exc}") from None
    return rows
