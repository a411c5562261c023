"""``tradecanvas_subscriber_queue_high_water``: the deepest any subscriber's queue has been
lately, not since it connected.

A peak kept since a subscriber connected told nothing of the present after one slow moment:
a chart connected for days showed that moment's depth for days. Each queue keeps its peak
since the Hub last took it (``SubscriberQueue.take_high_water``); the Hub takes them when
``/metrics`` is scraped, and from a subscriber that leaves, into :class:`RecentHighWater`,
which keeps the peak per window of :data:`WINDOW_S` and shows this window's and the one
before: a peak taken stays on the gauge for one to two windows, so a scrape every
:data:`WINDOW_S` (Prometheus's default interval) or more often sees each, whichever
scraper takes it, and a quiet minute later the gauge is back to what the queues hold.
Plain data, no I/O: time is passed in.
"""

from __future__ import annotations

from typing import Final, final

# seconds per window; the gauge covers the last one to two of them
WINDOW_S: Final = 60.0


@final
class RecentHighWater:
    """The peak of the depths :meth:`note` was told, over this window and the one before."""

    __slots__ = ("_current", "_previous", "_window", "window_s")

    def __init__(self, window_s: float = WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError("the window must be positive")
        self.window_s = window_s
        self._window: int | None = None  # the current window's number (now // window_s)
        self._current = 0
        self._previous = 0

    def note(self, depth: int, now: float) -> None:
        self._roll(now)
        self._current = max(self._current, depth)

    def peak(self, now: float) -> int:
        self._roll(now)
        return max(self._current, self._previous)

    def _roll(self, now: float) -> None:
        window = int(now // self.window_s)
        if window == self._window:
            return
        follows = self._window is not None and window == self._window + 1
        self._previous = self._current if follows else 0
        self._current = 0
        self._window = window


__all__ = ["WINDOW_S", "RecentHighWater"]
