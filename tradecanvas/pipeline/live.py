"""The bars a live minute completes, when the short way of ``BatchCommit`` can make them
from what :class:`RecentBars` knows (no read): from 1m, or from another derived timeframe
whose bar this minute completes too (15m from 5m, 1h from 15m). Sans-IO."""

from __future__ import annotations

import operator
from collections.abc import Collection, Iterable, Sequence
from typing import Final

from tradecanvas.model import MINUTE, Candle, SeriesId
from tradecanvas.pipeline.derive import aggregate
from tradecanvas.pipeline.levels import Level
from tradecanvas.pipeline.recent import RecentBars

# (C-level getters: a bar's parts are checked without a Python loop)
_CANDLE: Final = operator.itemgetter(0)  # StoredCandle.candle
_COMPLETE: Final = operator.itemgetter(2)  # StoredCandle.complete
_VOLUME: Final = operator.attrgetter("volume")


def level_marks(levels: Iterable[Level], t: int) -> list[tuple[Level, int, int, bool]]:
    """Per level (every grid fixed): its length, the bucket of the minute ``t`` and whether
    ``t`` is the bucket's last minute."""
    marks = []
    for level in levels:
        length = level.length
        assert length is not None
        into = (t - level.offset) % length  # how far into its bucket the minute is
        marks.append((level, length, t - into, into >= length - MINUTE))
    return marks


def due_bars(
    recent: RecentBars,
    checked: Collection[str],
    sid: str,
    candle: Candle,
    due: Sequence[tuple[Level, int, tuple[SeriesId, str]]],
) -> list[tuple[Candle, bool]] | None:
    """The bars ``candle`` completes (``due``: levels each after its source), each new
    above its series' known head (or its series' first: True beside it) and built from
    source bars all known, complete and not all empty — what the long way would make of
    them — or None (take the long way). A level built from 1m takes this series' minutes;
    one built from another derived timeframe takes that timeframe's known bars and the bar
    made of the same bucket end just before in ``due`` (grids nest: it is due too). The
    bucket a series' listing lies inside has fewer parts than ``level.parts``: the long way
    gives it its bar (``pipeline/bars.py``), once per listing and timeframe."""
    t = candle.candle_time
    bars: list[tuple[Candle, bool]] = []
    made: dict[int, tuple[str, Candle]] = {}  # by timeframe length: its series, its bar here
    for level, bucket, (_, dsid) in due:
        derived_head = recent.known_head(dsid)
        if derived_head is None:
            if not recent.knows_head(dsid):
                return None
            # nothing stored: its first bar (the fingerprint is checked then, with no
            # event whatever it finds)
        elif derived_head >= bucket or dsid not in checked:
            return None
        if level.source.seconds == MINUTE:
            last = candle
            rows = recent.known_range(sid, bucket, t)
        else:
            found = made.get(level.source.seconds)
            if found is None:
                return None  # (not made here: its source bar is not this minute's)
            source_sid, last = found
            rows = recent.known_range(source_sid, bucket, last.candle_time)
        if rows is None or len(rows) + 1 != level.parts or not all(map(_COMPLETE, rows)):
            return None
        parts = [*map(_CANDLE, rows), last]
        if not any(map(_VOLUME, parts)):  # (a Decimal is true when not 0)
            return None  # flat at the previous close: the long way looks it up
        bar = aggregate(bucket, parts)
        bars.append((bar, derived_head is None))
        made[level.tf.seconds] = (dsid, bar)
    return bars


__all__ = ["due_bars", "level_marks"]
