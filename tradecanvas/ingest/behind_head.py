"""BehindHead: closed klines at or below a series' head, said in one WARNING a minute (pure).

A closed kline at or below its series' head (the newest minute stored or released for
commit) brings nothing new: the tracker drops a copy of a minute it remembers, and the
pipeline one equal to the stored bar (a copy that differs is stored as a revision, with its
``factor.rebuild``). One such close now and then is normal — Binance may send the last
close again after a reconnect, ``replay --duplicate-close`` does — but a run of them means
the source is behind the store: ``tradecanvas replay`` started again on a store that holds
its bars already, or a source serving old data. Then nothing is committed and the daemon
used to say nothing. :class:`BehindHead` counts them per series::

    3 closed klines at or below the store's head (2025-07-07 00:22 UTC) ignored for
    binance:futures:BTC/USDT:1m (is the source behind the store? a replay restarted?);
    bars past the head are stored as they come

The first line comes at the ``STREAK_MIN``-th such close in a row (a close above the head
ends a run), then at most one every ``EVERY_S`` while the run goes on, each with the count
since the line before; when a run that was reported ends, a last line says so, with the
closes not reported yet. :class:`~tradecanvas.ingest.core.IngestCore` notes every closed
kline of the stream (:meth:`BehindHead.note`, the time passed in); the loop takes the lines
due (:meth:`BehindHead.take_lines`) after each burst of frames and logs them as warnings.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final, final

from tradecanvas.model import SeriesId

# closes in a row at or below the head before the first line: a reconnect's repeated close
# (one) says nothing
STREAK_MIN: Final = 3
# at most one line a minute per series while a run goes on
EVERY_S: Final = 60.0


def _utc(t: int) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M UTC")


@final
class _Run:
    """One series' closes at or below its head, in a row."""

    __slots__ = ("head", "in_row", "reported_at", "unreported")

    def __init__(self, head: int) -> None:
        self.head = head
        self.in_row = 0
        self.unreported = 0
        self.reported_at: float | None = None  # the run's last line (None: none yet)


@final
class BehindHead:
    """The runs of closed klines at or below each series' head, and the log lines they call
    for (see the module docstring)."""

    __slots__ = ("_lines", "_runs", "every_s", "streak_min")

    def __init__(self, *, streak_min: int = STREAK_MIN, every_s: float = EVERY_S) -> None:
        self.streak_min = streak_min
        self.every_s = every_s
        self._runs: dict[SeriesId, _Run] = {}
        self._lines: list[str] = []

    def note(self, sid: SeriesId, open_time: int, head: int | None, now: float) -> None:
        """A closed kline of ``sid`` opening at ``open_time`` arrived at ``now``
        (monotonic) while the series' head was ``head``."""
        if head is None or open_time > head:
            run = self._runs.pop(sid, None) if self._runs else None
            if run is not None and run.reported_at is not None:
                more = f" ({run.unreported} more ignored before)" if run.unreported else ""
                self._lines.append(
                    f"{sid}: closed klines are past the store's head again{more};"
                    " stored as they come"
                )
            return
        run = self._runs.get(sid)
        if run is None:
            run = self._runs[sid] = _Run(head)
        run.head = head
        run.in_row += 1
        run.unreported += 1
        if run.in_row < self.streak_min:
            return
        if run.reported_at is not None and now - run.reported_at < self.every_s:
            return
        self._lines.append(
            f"{run.unreported} closed klines at or below the store's head ({_utc(head)})"
            f" ignored for {sid} (is the source behind the store? a replay restarted?);"
            " bars past the head are stored as they come"
        )
        run.unreported = 0
        run.reported_at = now

    def take_lines(self) -> list[str]:
        """The lines due since the last call (to log as warnings), oldest first."""
        if not self._lines:
            return []
        lines, self._lines = self._lines, []
        return lines


__all__ = ["EVERY_S", "STREAK_MIN", "BehindHead"]
