"""The derived timeframes as a commit walks them: for each, its source and the bucket
arithmetic it needs every time, worked out once (Level, DerivationPlan); and the small
helpers that cut times into buckets and runs. Plain data, no I/O."""

from __future__ import annotations

import bisect
from collections.abc import Iterator, Mapping, Sequence

import attrs

from tradecanvas.model import SeriesId, Timeframe, derivation_sources


@attrs.frozen
class Level:
    """One derived timeframe with what its commit asks of it every time, worked out once."""

    tf: Timeframe
    source: Timeframe
    order: int  # in the configured list
    # fixed grids that do not depend on the symbol: bucket = t - (t - offset) % length
    length: int | None
    offset: int
    parts: int | None  # source bars in a bucket (None: it varies, a month)

    @classmethod
    def of(cls, tf: Timeframe, source: Timeframe, order: int) -> Level:
        grid = tf.fixed and not tf.phased
        offset = tf.floor(tf.seconds * 1000) % tf.seconds if grid else 0
        parts = tf.seconds // source.seconds if tf.fixed else None
        return cls(tf, source, order, tf.seconds if grid else None, offset, parts)

    def floor(self, t: int, phase: int) -> int:
        if self.length is None:
            return self.tf.floor(t, phase)
        return t - (t - self.offset) % self.length

    def next_open(self, bucket: int) -> int:
        return self.tf.next_open(bucket) if self.length is None else bucket + self.length


@attrs.frozen
class DerivationPlan:
    """Which timeframes are derived, each from which (:func:`derivation_sources`), and for
    each timeframe the ones built from it (whose current bucket RecentBars keeps)."""

    derived: tuple[Timeframe, ...]  # configured order
    sources: Mapping[Timeframe, Timeframe]
    order: Mapping[Timeframe, int]
    consumers: Mapping[Timeframe, tuple[Timeframe, ...]]
    ascending: tuple[Timeframe, ...] = ()  # derived, shortest first (each after its source)
    levels: tuple[Level, ...] = ()  # in ``ascending`` order
    # by a timeframe's text: the levels built from it (whose current bucket RecentBars keeps)
    consumed_by: Mapping[str, tuple[Level, ...]] = attrs.field(factory=dict)

    @classmethod
    def of(cls, derived: Sequence[Timeframe]) -> DerivationPlan:
        sources = derivation_sources(derived)
        consumers: dict[Timeframe, tuple[Timeframe, ...]] = {}
        for tf, source in sources.items():
            consumers[source] = (*consumers.get(source, ()), tf)
        order = {tf: i for i, tf in enumerate(derived)}
        ascending = tuple(sorted(derived))
        levels = tuple(Level.of(tf, sources[tf], order[tf]) for tf in ascending)
        consumed_by = {
            source.text: tuple(level for level in levels if level.source == source)
            for source in consumers
        }
        return cls(tuple(derived), sources, order, consumers, ascending, levels, consumed_by)


def buckets_of(level: Level, phase: int, times: Sequence[int]) -> set[int]:
    """``{level.floor(t, phase) for t in times}`` for ascending ``times``: one floor per
    bucket (arithmetic on a fixed grid), the bucket's other times skipped by bisection."""
    buckets: set[int] = set()
    add, floor, next_open = buckets.add, level.floor, level.next_open
    i, count = 0, len(times)
    while i < count:
        bucket = floor(times[i], phase)
        add(bucket)
        i = bisect.bisect_left(times, next_open(bucket), i + 1)
    return buckets


def series_order(series: SeriesId) -> tuple[str, str, str, int]:
    """SeriesId's own order (attrs compares the fields in turn), as a cheap key."""
    return (series.exchange, series.market, series.symbol, series.timeframe.seconds)


def runs_of(times: Sequence[int], gap: int) -> Iterator[tuple[int, int]]:
    """(first, last) of each run of ascending ``times`` whose neighbours are <= ``gap`` apart."""
    first = last = times[0]
    for t in times[1:]:
        if t - last > gap:
            yield first, last
            first = t
        last = t
    yield first, last


def bucket_runs(level: Level, buckets: Sequence[int], most: int) -> Iterator[Sequence[int]]:
    """Runs of consecutive ``buckets`` (ascending), at most ``most`` each."""
    if len(buckets) == 1:
        yield buckets
        return
    run: list[int] = []
    for bucket in buckets:
        if run and (level.next_open(run[-1]) != bucket or len(run) >= most):
            yield run
            run = []
        run.append(bucket)
    if run:
        yield run


__all__ = ["DerivationPlan", "Level", "bucket_runs", "buckets_of", "runs_of", "series_order"]
