"""What subscribers are owed before a forming candle, and when a batch is due (pure).

DESIGN §10: per subscription, candle times never go backwards across message types. A
charting client keeps its newest bar and drops any closed candle older than it, so a
``candle_forming`` for bar ``t`` of a series may reach the hub only once every closed candle
before ``t`` of that series — base and derived — has been published. Nothing here imports
trio; :class:`~tradecanvas.ingest.core.IngestCore` drives it.

:class:`FormingGate` holds the forming candle of a series (the newest only) while either

- its tracker's head is below ``t - 60``: a minute before ``t`` is not settled yet (a close
  held above a hole, a REST fill, the initial backfill, a late close not yet repaired); or
- anything of the series was queued for a commit and is not yet committed and published:
  released closes (in the batcher or in the batch being committed) and runs of minutes
  confirmed absent. Everything queued for a series lies at or below its head, so below any
  forming bar that passes the first test — a count per series is enough.

Derived forming bars go out with their base candle, so they are held with it: a derived
closed bar is committed and published by the same pipeline run as the base minute (or the
absent run) that completes its bucket.

:func:`group_settled` is the flush rule when ``binance_ws_flush_s`` is above 0: a batch goes
to the pipeline at once when no series of the connection group is still expected to close
the newest minute (with 0, the default, every batch goes at once: a group commit).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import final

from tradecanvas.model import MINUTE, Candle, SeriesId


@final
class FormingGate:
    """The held forming candle of each series (the newest only) and what each series is
    owed: entries queued for a commit that are not yet committed and published."""

    def __init__(self) -> None:
        self._owed: dict[SeriesId, int] = {}
        self._held: dict[SeriesId, Candle] = {}

    def owe(self, series: SeriesId, count: int = 1) -> None:
        """``count`` entries of ``series`` were queued for a commit."""
        self._owed[series] = self._owed.get(series, 0) + count

    def settle(self, series: SeriesId, count: int = 1) -> None:
        """``count`` entries of ``series`` were committed and published."""
        left = self._owed.get(series, 0) - count
        if left > 0:
            self._owed[series] = left
        else:
            self._owed.pop(series, None)

    def owes(self, series: SeriesId) -> bool:
        return series in self._owed

    def allows(self, series: SeriesId, t: int, head: int | None) -> bool:
        """May a forming candle of bar ``t`` go out now, the series' tracker at ``head``?"""
        return head is not None and head >= t - MINUTE and series not in self._owed

    def hold(self, series: SeriesId, candle: Candle) -> None:
        """Keep ``candle`` until :meth:`release`; it replaces an older held one."""
        held = self._held.get(series)
        if held is None or candle.candle_time >= held.candle_time:
            self._held[series] = candle

    def held(self, series: SeriesId) -> Candle | None:
        return self._held.get(series)

    def drop(self, series: SeriesId, upto_time: int | None = None) -> None:
        """Forget the held candle of ``series`` (only if its bar is at or before
        ``upto_time``, when given: that bar's close arrived)."""
        held = self._held.get(series)
        if held is not None and (upto_time is None or held.candle_time <= upto_time):
            del self._held[series]

    def release(self, heads: Mapping[SeriesId, int | None]) -> list[tuple[SeriesId, Candle]]:
        """The held candles that may go out now (forgotten here); those whose own bar
        closed meanwhile are dropped."""
        released: list[tuple[SeriesId, Candle]] = []
        for series, candle in list(self._held.items()):
            head = heads.get(series)
            if head is not None and candle.candle_time <= head:
                del self._held[series]  # its own close is in: the bar is no longer forming
            elif self.allows(series, candle.candle_time, head):
                del self._held[series]
                released.append((series, candle))
        return released

    def __len__(self) -> int:
        """Series with a held forming candle."""
        return len(self._held)


def group_settled(heads: Mapping[SeriesId, int | None], last_open: Mapping[SeriesId, int]) -> bool:
    """Has every series of a connection group that is live at the group's newest settled
    minute settled it too?

    The newest minute is the highest head. A series is live at it when a frame of that
    minute or a later one arrived for it (``last_open``: the newest kline open time seen per
    series); a quiet series, one whose stream stopped, or one not seen yet is not waited
    for. A live series below it is still expected to close it (a close on its way, a REST
    repair): the batch waits for it, at most ``binance_ws_flush_s``.
    """
    settled = [h for h in heads.values() if h is not None]
    if not settled:
        return True
    newest = max(settled)
    for series, head in heads.items():
        live = last_open.get(series, -1) >= newest
        if live and (head is None or head < newest):
            return False
    return True
