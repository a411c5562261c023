"""Runs of minutes as ``[start, end)`` ranges (unix seconds): the small arithmetic the
tracker (``tradecanvas.ingest.tracker``) and the batcher share. Pure, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import pairwise

from tradecanvas.model import MINUTE


def runs(times: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """Ascending minute times as maximal ``[start, end)`` runs."""
    found: list[tuple[int, int]] = []
    for t in times:
        if found and found[-1][1] == t:
            found[-1] = (found[-1][0], t + MINUTE)
        else:
            found.append((t, t + MINUTE))
    return tuple(found)


def missing_below(
    head: int | None, stored: Iterable[int], window_s: int
) -> tuple[tuple[int, int], ...]:
    """Runs of minutes missing between the ``stored`` minutes within ``window_s`` below
    ``head``. A run that began below the window (its stored minute before it is older) is
    clipped to the window; none is found below the first stored minute (that may be the
    series' start)."""
    if head is None:
        return ()
    low = head - window_s
    known = set(stored)
    times = sorted(t for t in known if low <= t <= head)
    anchor = max((t for t in known if t < low), default=None)
    if anchor is not None:
        times.insert(0, anchor)
    clipped = ((max(a + MINUTE, low), b) for a, b in pairwise(times))
    return tuple((a, b) for a, b in clipped if b > a)


def subtract_ranges(
    ranges: Sequence[tuple[int, int]], removed: Sequence[tuple[int, int]]
) -> tuple[tuple[int, int], ...]:
    """``ranges`` without ``removed`` (both ``[start, end)``), in the order of ``ranges``."""
    cuts = sorted(removed)
    result: list[tuple[int, int]] = []
    for start, end in ranges:
        lo = start  # what is left of this range starts here
        for cut_start, cut_end in cuts:
            if cut_end <= lo or cut_start >= end:
                continue
            if lo < cut_start:
                result.append((lo, cut_start))
            lo = cut_end
        if lo < end:
            result.append((lo, end))
    return tuple(result)


__all__ = ["missing_below", "runs", "subtract_ranges"]
