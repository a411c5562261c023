"""Where ``tradecanvas import`` ends a transaction: never inside a derived bucket (pure).

A transaction's candles are committed and every derived bucket they touch is derived from
what is stored by then. For a series the store already holds above the import (history
loaded behind the live edge), a bucket cut in two by a transaction's end was derived from
its first part as an incomplete bar, with a ``gap`` (``incomplete``) event in the event log,
then derived again, whole, by the next transaction and counted as revised: a year behind the
live edge logged 347 such events and said "107 revised" of 1d bars that were all new.

:func:`transaction_end` picks the end so that no bucket of any derived timeframe holds
candles on both sides: the latest boundary common to every timeframe at or before the
``batch``-th candle (with the default timeframes, 5m to 1d, the last midnight), else the
first after it (a bucket longer than the batch: the transaction grows up to
:data:`MAX_TRANSACTION` candles to reach it, waiting for the next file if need be; the last
file's end is such a boundary too), else, with no such boundary in reach (``1w`` and ``1M``
share one a few times a year), the same for all but the longest timeframe, and so on; with
none at all, ``batch``.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from typing import Final

from tradecanvas.model import MINUTE
from tradecanvas.pipeline.levels import Level

# the most candles one transaction takes to end at a boundary: a month of minutes fits
MAX_TRANSACTION: Final = 50_000


def _floor_all(levels: Sequence[tuple[Level, int]], t: int) -> int:
    """The latest time at or before ``t`` that opens a bucket of every level."""
    while True:
        low = min(level.floor(t, phase) for level, phase in levels)
        if low == t:
            return t
        t = low


def _ceil_all(levels: Sequence[tuple[Level, int]], t: int, limit: int) -> int | None:
    """The first time at or after ``t`` that opens a bucket of every level, None past
    ``limit``."""
    while t <= limit:
        high = t
        for level, phase in levels:
            bucket = level.floor(t, phase)
            if bucket != t:
                high = max(high, level.next_open(bucket))
        if high == t:
            return t
        t = high
    return None


def transaction_end(
    times: Sequence[int],
    batch: int,
    levels: Sequence[tuple[Level, int]],
    *,
    rest: bool,
) -> int:
    """How many of the queued candles (open ``times``, ascending) the next transaction
    takes; 0: none yet, wait for the next file. ``levels``: each derived level with its
    phase, shortest first; ``rest``: no more candles will come (take them all, in
    transactions that end at boundaries where the queue allows)."""
    count = len(times)
    if count == 0 or (not rest and count < batch):
        return 0
    if count <= batch and rest:
        return count

    def start_of(k: int) -> int:
        """Where the candles from the ``k``-th on start: the queue's end is the minute
        after its last candle (a file that ends with a bucket ends a transaction)."""
        return times[k] if k < count else times[-1] + MINUTE

    last = min(batch, count)  # where the next transaction starts, at the latest
    for used in range(len(levels), 0, -1):
        some = levels[:used]
        boundary = _floor_all(some, start_of(last))
        if boundary > times[0]:
            return bisect_left(times, boundary)
        reach = min(count, MAX_TRANSACTION)
        after = _ceil_all(some, start_of(last), start_of(reach))
        if after is not None:
            return bisect_left(times, after)
        if count <= MAX_TRANSACTION:
            # the boundary may be in the next file; with none to come, the files end here
            return count if rest else 0
    return min(batch, count)


__all__ = ["MAX_TRANSACTION", "transaction_end"]
