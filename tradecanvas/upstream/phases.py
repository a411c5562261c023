"""The phase of each symbol's multi-day grid (Binance's ``3d`` bars), learned from Binance.

Binance's 3d bars are not aligned to the epoch: each symbol's grid starts at its first daily
bar (BINANCE.md). The phase — the open time of any 3d bar modulo three days — is asked from
Binance (one 3d kline over REST), kept in the store's meta table, and read back from there
when Binance cannot be reached. For the symbols whose phase is documented in the shared
data's SOURCES.md there is a last-resort table. Every start-up logs where the phase came from.
"""

from __future__ import annotations

import logging
from typing import Final, Protocol

from tradecanvas.errors import TradeCanvasError
from tradecanvas.model import DAY, SeriesId, Timeframe

log = logging.getLogger(__name__)

# (market, symbol) → phase in seconds, from Binance's own bars in public repositories
# (the shared data's SOURCES.md, "Alignment"); only used when Binance cannot be asked
KNOWN_PHASES: Final[dict[tuple[str, str], int]] = {
    ("spot", "BTC/USDT"): 1 * DAY,
    ("spot", "ETH/USDT"): 1 * DAY,
    ("spot", "ETH/BTC"): 0,
    ("spot", "NEO/BTC"): 0,
    ("spot", "VEN/BTC"): 2 * DAY,
    ("spot", "POWR/BTC"): 2 * DAY,
    ("futures", "BTC/USDT"): 2 * DAY,
}


class PhaseSource(Protocol):
    """What learning a phase needs: Binance REST and the store's meta table."""

    async def latest_open_time(self, series: SeriesId) -> int | None: ...


class PhaseMemory(Protocol):
    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta(self, key: str, value: str) -> None: ...


def phase_key(series: SeriesId, timeframe: Timeframe) -> str:
    return f"phase:{timeframe}:{series.market}:{series.symbol}"


async def learn_phase(
    series: SeriesId, timeframe: Timeframe, rest: PhaseSource, memory: PhaseMemory
) -> int | None:
    """The phase (seconds) of ``series``'s ``timeframe`` grid, or None when nobody knows it
    (the timeframe is then not derived for that symbol, and a warning says so)."""
    key = phase_key(series, timeframe)
    name = f"{series.market}:{series.symbol} {timeframe}"
    try:
        latest = await rest.latest_open_time(series.with_timeframe(timeframe))
    except TradeCanvasError as exc:
        latest = None
        problem = str(exc)
    else:
        problem = "Binance has no bar"
    if latest is not None:
        phase = latest % timeframe.seconds
        await memory.set_meta(key, str(phase))
        log.info("%s: grid phase %d s, from Binance (bar open %d)", name, phase, latest)
        return phase
    stored = await memory.get_meta(key)
    if stored is not None and stored.isdigit():
        log.warning("%s: grid phase %s s from the store (Binance: %s)", name, stored, problem)
        return int(stored)
    known = KNOWN_PHASES.get((series.market, series.symbol))
    if known is not None and timeframe.seconds == 3 * DAY:
        log.warning(
            "%s: grid phase %d s from the built-in table (Binance: %s)", name, known, problem
        )
        return known
    log.warning(
        "%s: grid phase unknown (Binance: %s); not derived until Binance answers", name, problem
    )
    return None
