"""The Hub's failure reports for ``best_effort`` (``IngestPipeline.publish``): which failed
subscribers a closed or system publish of a series reports.

A connection whose delivery failed is freed at ``Hub.detach``; only its description waits,
per series it held, until the next closed/system publish of one of those series reports it
(once, by whichever publishes first; the others skip it). Per series at most
:data:`MAX_FAILURES_LISTED` descriptions wait and the rest are counted, so a halted series
holds a few bytes however many clients failed on it. Plain data, no I/O; nothing raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final, final

import attrs

# failure descriptions returned by one publish call at most (the rest are summarised)
MAX_FAILURES_LISTED: Final = 20


@attrs.define
class _Failed:
    """A detached failed subscriber's report, shared by its series (``reported``: by one of
    them; the others skip it)."""

    text: str
    reported: bool = False


@attrs.define
class _PendingFailures:
    """One series' detached failed subscribers not reported yet: at most
    ``MAX_FAILURES_LISTED`` reports and how many more."""

    listed: list[_Failed] = attrs.Factory(list)
    more: int = 0

    def add(self, failed: _Failed) -> None:
        if len(self.listed) >= MAX_FAILURES_LISTED:
            self.listed = [f for f in self.listed if not f.reported]
        if len(self.listed) < MAX_FAILURES_LISTED:
            self.listed.append(failed)
        else:
            self.more += 1


@final
class FailureReports:
    """Per series, the detached failed subscribers' descriptions not reported yet."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        # series id → its detached failed subscribers' reports, until its next publish
        self._pending: dict[str, _PendingFailures] = {}

    def add(self, text: str, series_ids: Iterable[str]) -> None:
        """A detached failed subscriber (``text``), for the next publish of any of
        ``series_ids`` (the series it held) to report."""
        failed = _Failed(text)
        for sid in series_ids:
            self._pending.setdefault(sid, _PendingFailures()).add(failed)

    def reported(self, series_id: str, failures: list[str]) -> list[str]:
        """What one closed/system publish of ``series_id`` reports: its detached failed
        subscribers' descriptions (then forgotten), then ``failures`` (the fan-out's), at
        most ``MAX_FAILURES_LISTED`` listed and a count of the rest."""
        pending = self._pending.pop(series_id, None)
        more = 0
        if pending is not None:
            failures = [*(f.text for f in pending.listed if not f.reported), *failures]
            for failed in pending.listed:
                failed.reported = True  # once, by whichever of its series publishes first
            more = pending.more
        if len(failures) > MAX_FAILURES_LISTED:
            more += len(failures) - MAX_FAILURES_LISTED
            failures = failures[:MAX_FAILURES_LISTED]
        if more:
            failures.append(f"and {more} more subscriber(s)")
        return failures


__all__ = ["MAX_FAILURES_LISTED", "FailureReports"]
