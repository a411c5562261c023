"""The one retry policy: capped exponential backoff with full jitter.

Used for Binance reconnects, REST retries and REST fills, and the supervisor's restarts of a
crashed ingest loop. Full jitter (a uniform draw below the capped exponential) spreads the
retries of many clients, so a Binance outage does not end in a synchronised stampede.
"""

from __future__ import annotations

import random

import attrs


@attrs.frozen
class Backoff:
    """Retry ``attempt`` (1 for the first retry) waits a uniform time in
    ``[0, min(cap_s, base_s * 2 ** (attempt - 1))]``; attempt 0 waits nothing."""

    base_s: float
    cap_s: float

    def ceiling(self, attempt: int) -> float:
        """The longest wait of retry ``attempt`` (the jitter draws below it)."""
        if attempt <= 0:
            return 0.0
        return min(self.cap_s, self.base_s * 2.0 ** min(attempt - 1, 64))

    def delay(self, attempt: int) -> float:
        return random.uniform(0.0, self.ceiling(attempt))
