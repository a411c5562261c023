"""``tradecanvas backfill``'s progress on stderr: a bar on a terminal, else log lines.

The bar is drawn by hand: one line rewritten in place with ``\\r`` and erased to its end,
taken off the line before any log record (:class:`ClearProgressFilter`) and left on its own
line at the end.
"""

from __future__ import annotations

import logging
from typing import Final, TextIO, final

from tradecanvas.tools.backfill.plan import BackfillTally

# the command's one logger: its lines name ``tradecanvas.tools.backfill``
log = logging.getLogger(__package__)

PROGRESS_LOG_INTERVAL_S: Final = 5.0
PROGRESS_BAR_WIDTH: Final = 20


def render_bar(series_id: str, done: int, total: int, stored: int) -> str:
    """``binance:futures:BTC/USDT:1m  [#########-----------]  45%  4320/9600 min  3,950
    stored``"""
    fraction = done / total if total else 1.0
    filled = min(PROGRESS_BAR_WIDTH, int(fraction * PROGRESS_BAR_WIDTH))
    bar = "#" * filled + "-" * (PROGRESS_BAR_WIDTH - filled)
    return f"{series_id}  [{bar}]  {int(fraction * 100):3d}%  {done}/{total} min  {stored:,} stored"


@final
class Progress:
    """Reports the tally on stderr: on a terminal one line rewritten in place, otherwise a
    log line at most every :data:`PROGRESS_LOG_INTERVAL_S` and one when done."""

    def __init__(self, stream: TextIO, *, tty: bool) -> None:
        self.stream = stream
        self.tty = tty
        self._drawn = False
        self._last_log: float | None = None

    def update(self, tally: BackfillTally, now: float) -> None:
        sid, total = str(tally.plan.series), tally.plan.minutes
        if self.tty:
            line = render_bar(sid, tally.done_minutes, total, tally.stored)
            self.stream.write(f"\r{line}\x1b[K")
            self.stream.flush()
            self._drawn = True
        elif (
            tally.complete
            or self._last_log is None
            or (now - self._last_log >= PROGRESS_LOG_INTERVAL_S)
        ):
            self._last_log = now
            log.info(
                "backfill %s: %d/%d min (%d%%), %d stored",
                sid,
                tally.done_minutes,
                total,
                100 * tally.done_minutes // total if total else 100,
                tally.stored,
            )

    def clear(self) -> None:
        """Take the bar off the line (before a log line, and at the end)."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False

    def finish(self) -> None:
        """Leave the last state of the bar on its own line."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


@final
class ClearProgressFilter(logging.Filter):
    """On a terminal, a log line must not be written into the middle of the bar."""

    def __init__(self, progress: Progress) -> None:
        super().__init__()
        self.progress = progress

    def filter(self, record: logging.LogRecord) -> bool:
        self.progress.clear()
        return True
