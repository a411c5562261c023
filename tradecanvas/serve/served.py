"""How an ``unknown_series`` refusal describes what a daemon serves (pure).

A daemon can serve thousands of series (400 symbols × 6 timeframes): the refusal cannot list
them all, and a list cut at an arbitrary count reads as the whole of it (``5m`` missing from
it looked unserved). So it says what helps with the series asked for: the timeframes served
for that symbol when it is served (a wrong timeframe), else the symbols served (a wrong
symbol or market), at most :data:`MAX_LISTED` of them with a count of the rest; and where
the full list is.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Final

from tradecanvas.model import Timeframe

MAX_LISTED: Final = 10
FULL_LIST: Final = "GET /api/market/series lists every series"


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    rest = len(items) - MAX_LISTED
    return shown if rest <= 0 else f"{shown} and {rest:,} more"


def describe_served(series_id: str, served: Collection[str]) -> str:
    """What ``served`` holds, for a refusal of ``series_id`` (a series id's text)."""
    if not served:
        return "this daemon serves no series"
    symbol = series_id.rpartition(":")[0]
    by_symbol: dict[str, list[str]] = {}
    for sid in served:
        prefix, _, timeframe = sid.rpartition(":")
        by_symbol.setdefault(prefix, []).append(timeframe)
    timeframes = by_symbol.get(symbol)
    if timeframes:
        listed = ", ".join(sorted(timeframes, key=Timeframe.parse))  # shortest first
        return f"{symbol} is served in {listed}"
    symbols = sorted(by_symbol)
    return f"served: {_listed(symbols)}, each in its timeframes ({FULL_LIST})"


__all__ = ["FULL_LIST", "MAX_LISTED", "describe_served"]
