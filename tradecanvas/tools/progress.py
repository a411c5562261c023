"""Progress of the bulk commands (``import``, ``backfill``, ``migrate-store``) on stderr.

On a terminal: one rich progress bar per series, with the count done, the rate and the time
left, redrawn after each update (no refresh thread: the commands update after every
transaction). Log records written meanwhile are printed above the bars
(:meth:`Progress.capture_logs`), never into them. Not on a terminal: a plain log line per
series at most every :data:`PROGRESS_LOG_INTERVAL_S`, and one when a series is done.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Final, TextIO, final

import attrs
from rich.console import Console
from rich.progress import (
    BarColumn,
    ProgressColumn,
    Task,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Column
from rich.text import Text

PROGRESS_LOG_INTERVAL_S: Final = 5.0


def format_eta(seconds: float | None) -> str:
    """``1:02:03``, ``4:05``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


@attrs.define
class _Series:
    total: int | None
    started: float
    done: int = 0
    logged_at: float | None = None
    finished: bool = False

    def rate(self, now: float) -> float | None:
        elapsed = now - self.started
        return self.done / elapsed if elapsed > 0 and self.done else None

    def eta(self, now: float) -> float | None:
        rate = self.rate(now)
        if rate is None or self.total is None:
            return None
        return max(0, self.total - self.done) / rate


@final
class _RateColumn(ProgressColumn):
    """``12,345/s``: the task's rate over rich's recent samples."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text("" if speed is None else f"{speed:,.0f}/s")


@final
class Progress:
    """Per-series progress of one command: ``start(series, total)``, then ``update(series,
    done)`` with the count done so far, ``finish()`` at the end (also on failure).

    ``tty`` None: whether ``stream`` is a terminal. Not on one, the plain lines go to ``log``
    (None: written to ``stream``), naming the command by ``verb``:
    ``import binance:spot:BTC/USDT:1m: 1440/4320 candles (33%), 2100 candles/s, ETA 0:01``.
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        log: logging.Logger | None,
        verb: str,
        unit: str = "candles",
        tty: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = PROGRESS_LOG_INTERVAL_S,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.log = log
        self.verb = verb
        self.unit = unit
        self.clock = clock
        self.interval_s = interval_s
        self._series: dict[str, _Series] = {}
        self._tasks: dict[str, TaskID] = {}
        self._bars: RichProgress | None = None

    def _display(self) -> RichProgress:
        if self._bars is None:
            console = Console(file=self.stream, force_terminal=True, soft_wrap=False)
            fixed = Column(no_wrap=True)
            self._bars = RichProgress(
                TextColumn("{task.description}", table_column=fixed),
                BarColumn(bar_width=None),
                TaskProgressColumn(),
                TextColumn(
                    "{task.completed:,.0f}/{task.total:,.0f} " + self.unit,
                    table_column=Column(no_wrap=True),
                ),
                _RateColumn(table_column=Column(no_wrap=True)),
                TimeRemainingColumn(),
                console=console,
                auto_refresh=False,
                transient=False,
                expand=True,
                get_time=lambda: self.clock(),
            )
            self._bars.start()
        return self._bars

    def start(self, series: str, total: int | None) -> None:
        """A series begins (again: its total changes); ``total`` None when unknown."""
        known = self._series.get(series)
        if known is None:
            self._series[series] = _Series(total, self.clock())
        else:
            known.total = total
        if self.tty:
            bars = self._display()
            if series in self._tasks:
                bars.update(self._tasks[series], total=total)
            else:
                self._tasks[series] = bars.add_task(series, total=total)
            bars.refresh()

    def update(self, series: str, done: int, now: float | None = None) -> None:
        """``done`` of the series' total are through (a count, not an increment); ``now``
        on the progress' clock (default: read it)."""
        state = self._series.get(series)
        if state is None:
            self.start(series, None)
            state = self._series[series]
        state.done = done
        now = self.clock() if now is None else now
        complete = state.total is not None and done >= state.total
        if self.tty:
            bars = self._display()
            bars.update(self._tasks[series], completed=done)
            bars.refresh()
        elif (
            (complete and not state.finished)
            or state.logged_at is None
            or now - state.logged_at >= self.interval_s
        ):
            state.logged_at = now
            if self.log is None:
                self.stream.write(self.line(series, now) + "\n")
                self.stream.flush()
            else:
                self.log.info("%s", self.line(series, now))
        state.finished = complete

    def line(self, series: str, now: float | None = None) -> str:
        """The plain progress line of ``series``."""
        state = self._series[series]
        now = self.clock() if now is None else now
        rate = state.rate(now)
        if state.total:
            count = f"{state.done}/{state.total} {self.unit} ({100 * state.done // state.total}%)"
        else:
            count = f"{state.done} {self.unit}"
        speed = "" if rate is None else f", {rate:.0f} {self.unit}/s"
        eta = "" if state.total is None else f", ETA {format_eta(state.eta(now))}"
        return f"{self.verb} {series}: {count}{speed}{eta}"

    @property
    def drawn(self) -> bool:
        """Bars are on the terminal now."""
        return self._bars is not None

    def finish(self) -> None:
        """Leave the bars as they are, on their own lines (idempotent)."""
        if self._bars is not None:
            self._bars.refresh()
            self._bars.stop()
            self._bars = None

    def print_log(self, text: str) -> None:
        """One log line above the bars (on a terminal) or as it is."""
        if self._bars is not None:
            self._bars.console.print(Text(text))
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    @contextmanager
    def capture_logs(self) -> Iterator[None]:
        """While inside, on a terminal, the root logger's records are printed above the bars
        rather than written into them."""
        if not self.tty:
            yield
            return
        handlers = list(logging.getLogger().handlers)
        filters = [LogAboveBars(self, h) for h in handlers]
        for handler, f in zip(handlers, filters, strict=True):
            handler.addFilter(f)
        try:
            yield
        finally:
            for handler, f in zip(handlers, filters, strict=True):
                handler.removeFilter(f)


@final
class LogAboveBars(logging.Filter):
    """A handler's filter: while bars are drawn, the record is printed above them (in the
    handler's format) instead of by the handler into them. ``handler`` None: the root
    logger's handler this filter was added to."""

    def __init__(self, progress: Progress, handler: logging.Handler | None = None) -> None:
        super().__init__()
        self.progress = progress
        self.handler = handler

    def _handler(self) -> logging.Handler | None:
        if self.handler is None:
            self.handler = next(
                (h for h in logging.getLogger().handlers if self in h.filters), None
            )
        return self.handler

    def filter(self, record: logging.LogRecord) -> bool:
        handler = self._handler()
        if not self.progress.drawn or handler is None:
            return True
        if record.levelno >= handler.level:
            self.progress.print_log(handler.format(record))
        return False


__all__ = ["PROGRESS_LOG_INTERVAL_S", "LogAboveBars", "Progress", "format_eta"]
