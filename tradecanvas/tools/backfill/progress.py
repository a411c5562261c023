"""``tradecanvas backfill``'s progress on stderr, drawn by the shared
:class:`tradecanvas.tools.progress.Progress` (rich bars on a terminal, plain log lines
otherwise): the backfill's tally in minutes of its range."""

from __future__ import annotations

import logging
from typing import TextIO, final

from tradecanvas.tools.backfill.plan import BackfillTally
from tradecanvas.tools.progress import PROGRESS_LOG_INTERVAL_S, LogAboveBars
from tradecanvas.tools.progress import Progress as SharedProgress

# the command's one logger: its lines name ``tradecanvas.tools.backfill``
log = logging.getLogger(__package__)


@final
class Progress:
    """The backfill's view of the shared progress: one series, counted in minutes done of
    the range (``backfill SERIES: 1500/3100 min (48%), … min/s, ETA 0:02`` when not on a
    terminal). ``update`` takes the trio clock's ``now``."""

    def __init__(self, stream: TextIO, *, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self.shared: SharedProgress | None = None

    def update(self, tally: BackfillTally, now: float) -> None:
        sid = str(tally.plan.series)
        if self.shared is None:
            self.shared = SharedProgress(
                self.stream, log=log, verb="backfill", unit="min", tty=self.tty, clock=lambda: now
            )
            self.shared.start(sid, tally.plan.minutes)
        self.shared.clock = lambda: now
        self.shared.update(sid, tally.done_minutes, now)

    def clear(self) -> None:
        """Nothing to take off: log lines are printed above the bars."""

    def finish(self) -> None:
        """Leave the bars on their own lines."""
        if self.shared is not None:
            self.shared.finish()


@final
class ClearProgressFilter(logging.Filter):
    """On a terminal, a log line is printed above the bars, not into them (add it to the
    root logger's handlers)."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress
        self._inner: LogAboveBars | None = None

    def filter(self, record: logging.LogRecord) -> bool:
        shared = self.progress.shared
        if shared is None:
            return True
        if self._inner is None:
            handler = next((h for h in logging.getLogger().handlers if self in h.filters), None)
            self._inner = LogAboveBars(shared, handler)
        return self._inner.filter(record)


__all__ = ["PROGRESS_LOG_INTERVAL_S", "ClearProgressFilter", "Progress"]
