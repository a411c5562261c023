"""One dependency's outage in the log without a line per retry (pure: time is passed in).

A Redis that is away was logged at WARNING on every reconnect attempt — each of an edge's
two feed tasks, the publisher, the lease holder every renewal: some 480 lines on the leader
for a 10-minute outage. :class:`OutageLog` logs the first failure at WARNING, the retries
at DEBUG and, while it lasts, a WARNING summary at most every :data:`SUMMARY_EVERY_S`; the
caller's reconnect line gets how long the outage lasted and how many attempts failed
(:meth:`OutageLog.recovered`).
"""

from __future__ import annotations

import logging
from typing import Final, final

from tradecanvas.ops.logs import ThrottledCount

# while an outage lasts: one WARNING summary this often at most
SUMMARY_EVERY_S: Final = 60.0


@final
class OutageLog:
    """The log lines of one component's outages (see the module docstring)."""

    __slots__ = ("_attempts", "_lines", "_logger", "_since")

    def __init__(self, logger: logging.Logger) -> None:
        self._logger = logger
        self._since: float | None = None  # when the outage began (None: no outage)
        self._attempts = 0
        self._lines = ThrottledCount(SUMMARY_EVERY_S)  # the first failure, then one a minute

    @property
    def ongoing(self) -> bool:
        return self._since is not None

    def failed(self, now: float, line: str) -> None:
        """An attempt failed at ``now``; ``line`` says so (the first is logged as it is)."""
        if self._since is None:
            self._since, self._attempts = now, 0
            self._lines = ThrottledCount(SUMMARY_EVERY_S)
        self._attempts += 1
        if self._lines.add(now) is None:
            self._logger.debug("%s", line)
        elif self._attempts == 1:
            self._logger.warning("%s", line)
        else:
            self._logger.warning(
                "%s (still failing: %d attempts in %.0f s)",
                line,
                self._attempts,
                now - self._since,
            )

    def recovered(self, now: float) -> str:
        """The outage is over at ``now``: what the reconnect line adds (empty: none was
        going on)."""
        if self._since is None:
            return ""
        took, attempts = now - self._since, self._attempts
        self._since, self._attempts = None, 0
        return f" after {took:.1f} s ({attempts} failed attempt{'' if attempts == 1 else 's'})"


__all__ = ["SUMMARY_EVERY_S", "OutageLog"]
