"""The local clock's bound on a kline frame's times (pure but for the injected wall clock).

A frame is refused when it vouches for an instant after this machine's clock plus
:data:`~tradecanvas.model.CLOCK_SKEW_S` (60 s): its event time ``E``; a forming bar's open
time; a closed bar's end (the later of ``T + 1`` and its open time plus a minute — a closed
bar that has not ended is no closed bar). Only the future is refused, never the past, so a
replay of 2020 data at any speed passes: its frames carry the recording's times.

Why the bound matters: one accepted ``E`` in the year 2100 moved the exchange clock of the
whole connection there (every minute up to 2100 "late", thousands of REST calls, thousands
of ``gap`` events), and one accepted closed bar of 2100 became its series' head. Why 60 s:
the rule of the HTTP write path and of ``tradecanvas import`` (a candle that closes more
than CLOCK_SKEW_S after this machine's clock is refused); and Binance itself refuses a
signed request stamped more than its ``recvWindow`` (at most 60 s) behind its clock, so a
host whose clock lags Binance's by more than that cannot use Binance's API either. A frame
inside the bound moves the exchange clock at most about a minute ahead of the truth.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, final

from tradecanvas.model import CLOCK_SKEW_S, MINUTE_MS, MS
from tradecanvas.wire.binance import KlineEvent

SKEW_MS: Final = CLOCK_SKEW_S * MS


def vouched_ms(event: KlineEvent) -> int:
    """The latest instant (unix ms) a 1m kline frame says has passed: its ``E``, and its
    bar's open time (forming) or end (closed: the later of ``T + 1`` and ``t`` + 1 min)."""
    if event.closed:
        return max(event.event_time_ms, event.close_time_ms + 1, event.open_time_ms + MINUTE_MS)
    return max(event.event_time_ms, event.open_time_ms)


def _utc(ms: int) -> str:
    try:
        return datetime.fromtimestamp(ms / MS, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return "beyond year 9999"


def ahead_problem(event: KlineEvent, now_ms: int) -> str | None:
    """Why ``event`` lies too far ahead of the wall clock ``now_ms`` (the detail of the
    ``ahead_of_clock`` refusal), None when it does not."""
    limit = now_ms + SKEW_MS
    if vouched_ms(event) <= limit:
        return None
    if event.event_time_ms > limit:
        what = f"event time E={event.event_time_ms} ({_utc(event.event_time_ms)})"
    elif event.closed:
        end = max(event.close_time_ms + 1, event.open_time_ms + MINUTE_MS)
        what = f"closed bar t={event.open_time_ms} ends at {_utc(end)}"
    else:
        what = f"forming bar t={event.open_time_ms} opens at {_utc(event.open_time_ms)}"
    return (
        f"{event.stream_name}: {what}, more than {CLOCK_SKEW_S} s after this machine's clock"
        f" ({_utc(now_ms)}); not taken (nothing stored, the exchange clock not moved)"
    )


@final
class ClockBound:
    """:func:`ahead_problem` against ``wall_clock`` (unix seconds), read only when a frame
    names a time after the last reading's bound (:meth:`may_refuse`): about once a minute
    on a live feed, never for a replay of the past."""

    def __init__(self, wall_clock: Callable[[], float] = time.time) -> None:
        self._wall_clock = wall_clock
        self.limit_ms = -1  # now + skew at the last reading (a reading is due)

    def may_refuse(self, event: KlineEvent) -> bool:
        """The cheap test every frame takes (a few comparisons): False when none of its
        times is after the last reading's bound (then :meth:`problem` is None)."""
        limit = self.limit_ms
        return (
            event.event_time_ms > limit
            or event.close_time_ms >= limit
            or event.open_time_ms + MINUTE_MS > limit
        )

    def problem(self, event: KlineEvent) -> str | None:
        if vouched_ms(event) <= self.limit_ms:
            return None
        now_ms = int(self._wall_clock() * MS)
        self.limit_ms = now_ms + SKEW_MS
        return ahead_problem(event, now_ms)
