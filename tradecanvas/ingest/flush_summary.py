"""FlushSummary: a committer's group commits summed up in one INFO line a minute (pure).

A live daemon makes several group commits at every minute boundary per connection, and many
a second while it works off a backlog or catches up; one INFO line per commit filled the
journal. ``BatchCommitter`` now logs each flush at DEBUG (the line it always wrote) and
hands its numbers to a FlushSummary, which says when a summary line is due and writes it::

    NAME: 57 flushes in the last 60 s: 23,400 received, 23,380 committed, 20 duplicates,
    3 events; commit p50 4.1 ms max 12.3 ms, publish p50 1.2 ms max 5.0 ms (pipeline)

A summary is due at the first flush ``SUMMARY_S`` or more after the last summary (or after
the first flush, before the first summary); its window is that span, so after a quiet
spell it says how long the span really was. There is no timer task: the flush that finds
the summary due writes it. A committer with nothing to commit writes no summary — there is
nothing to summarise — and the flushes of the last minute before a stop are in none (the
DEBUG lines have them). Time is passed in (``trio.current_time()`` in the committer).
"""

from __future__ import annotations

import statistics
from typing import Final, final

# at most one summary line a minute per committer: the journal keeps the totals and the
# spread of the commit times without a line per group commit
SUMMARY_S: Final = 60.0


@final
class FlushSummary:
    """The flushes of one committer since its last summary line. ``add`` records a flush
    and returns the summary line when one is due (and starts a new window), else None.
    ``name`` prefixes the line and ``path`` (the publish path) ends it."""

    __slots__ = (
        "_commit_s",
        "_committed",
        "_duplicates",
        "_events",
        "_publish_s",
        "_received",
        "_since",
        "name",
        "path",
    )

    def __init__(self, name: str, path: str) -> None:
        self.name = name
        self.path = path
        self._since: float | None = None  # the last summary, or the first flush
        self._received = 0
        self._committed = 0
        self._duplicates = 0
        self._events = 0
        # one entry per flush: at most a few thousand a minute, each a store transaction
        self._commit_s: list[float] = []
        self._publish_s: list[float] = []

    def add(
        self,
        now: float,
        *,
        received: int,
        committed: int,
        duplicates: int,
        events: int,
        commit_s: float,
        publish_s: float,
    ) -> str | None:
        """Record one flush that ended at ``now`` (monotonic seconds); the summary line of
        the window it closes, or None while the window is shorter than ``SUMMARY_S``."""
        if self._since is None:
            self._since = now
        self._received += received
        self._committed += committed
        self._duplicates += duplicates
        self._events += events
        self._commit_s.append(commit_s)
        self._publish_s.append(publish_s)
        elapsed = now - self._since
        if elapsed < SUMMARY_S:
            return None
        line = self._line(elapsed)
        self._since = now
        self._received = self._committed = self._duplicates = self._events = 0
        self._commit_s.clear()
        self._publish_s.clear()
        return line

    def _line(self, elapsed: float) -> str:
        flushes = len(self._commit_s)
        return (
            f"{self.name}: {flushes} flush{'' if flushes == 1 else 'es'} in the last"
            f" {elapsed:.0f} s: {self._received:,} received, {self._committed:,} committed,"
            f" {self._duplicates:,} duplicates, {self._events:,} events;"
            f" commit {_spread(self._commit_s)}, publish {_spread(self._publish_s)}"
            f" ({self.path})"
        )


def _spread(seconds: list[float]) -> str:
    """``p50 4.1 ms max 12.3 ms`` of durations in seconds (the median of an even count is
    the mean of the middle two)."""
    return f"p50 {statistics.median(seconds) * 1e3:.1f} ms max {max(seconds) * 1e3:.1f} ms"
