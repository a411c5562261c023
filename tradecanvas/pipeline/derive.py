"""Binance-exact derivation of higher timeframes (DESIGN §4, BINANCE.md). Sans-IO.

The rule, checked against Binance's own bars in ``tests/pipeline/test_derive.py``: open, high
and low come from the parts that traded (volume > 0) — Binance's bar ignores empty minutes —
close is the last part's close, volumes and counts are summed; a bucket whose parts are all
empty is flat at the previous close with volume 0.

The rule is associative: a bar summed from sub-bars (15m from 5m, 1d from 4h) equals the bar
summed from the minutes, because an empty sub-bar is itself flat at the previous close with
volume 0. So every derived timeframe is built from the largest smaller one that nests in it
(:func:`tradecanvas.model.derivation_sources`): a commit reads a handful of sub-bars per level
instead of the 1,440 minutes of a day or the 44,640 of a month.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from decimal import Decimal
from typing import NamedTuple

import attrs

from tradecanvas.model import MINUTE, Candle, Timeframe, derivation_sources
from tradecanvas.store.types import StoredCandle, UpsertOutcome, plan_upsert

_ZERO = Decimal(0)


class DerivedCandle(NamedTuple):
    """A derived bar and whether every part of its bucket was there (a named tuple: a
    history derives one per bucket, and it costs a third of a frozen attrs class)."""

    candle: Candle
    complete: bool


@attrs.frozen
class Part:
    """A bar being summed into a larger one, with its own completeness."""

    candle: Candle
    complete: bool = True


def aggregate(
    bucket_time: int, parts: Sequence[Candle], previous_close: Decimal | None = None
) -> Candle:
    """One bar from ``parts`` (ascending, non-empty, all inside the bucket), in one pass.

    Equal to :func:`aggregate_reference` (the rule written plainly; the tests hold them equal
    for all inputs)."""
    # the sums start from the first part, not from 0: one Decimal addition fewer per field
    # (a fifth of a 5m bar's). The same values; the same text too (0 + x has x's digits),
    # but for a first part of -0, which the store then holds as "-0", not "0"
    first = parts[0]
    volume = first.volume
    quote = first.quote_volume
    trades = first.trades
    base_taker = first.taker_buy_base
    quote_taker = first.taker_buy_quote
    if volume:  # traded (a valid volume is >= 0; a Decimal's truth is ~5x cheaper than > 0)
        open_: Decimal | None = first.open
        high, low = first.high, first.low
    else:
        open_ = None
        high = low = _ZERO  # set from the first part that traded
    for p in parts[1:]:
        v = p.volume
        volume += v
        if v:
            if open_ is None:
                open_, high, low = p.open, p.high, p.low
            else:
                if p.high > high:
                    high = p.high
                if p.low < low:
                    low = p.low
        # an extra is summed while every part knows it (None from the first that does not)
        if quote is not None:
            x = p.quote_volume
            quote = None if x is None else quote + x
        if trades is not None:
            n = p.trades
            trades = None if n is None else trades + n
        if base_taker is not None:
            x = p.taker_buy_base
            base_taker = None if x is None else base_taker + x
        if quote_taker is not None:
            x = p.taker_buy_quote
            quote_taker = None if x is None else quote_taker + x
    if open_ is None:
        open_ = high = low = close = previous_close if previous_close is not None else first.open
    else:
        close = parts[-1].close
    return Candle(
        bucket_time, open_, high, low, close, volume, quote, trades, base_taker, quote_taker
    )


def _sum_known(values: Sequence[Decimal | None]) -> Decimal | None:
    if not values or any(v is None for v in values):
        return None
    return sum((v for v in values if v is not None), Decimal(0))


def aggregate_reference(
    bucket_time: int, parts: Sequence[Candle], previous_close: Decimal | None = None
) -> Candle:
    """The rule as first written (the module docstring), for the tests of :func:`aggregate`."""
    traded = [p for p in parts if p.volume > 0]
    if traded:
        open_ = traded[0].open
        high = max(p.high for p in traded)
        low = min(p.low for p in traded)
        close = parts[-1].close
    else:
        open_ = high = low = close = previous_close if previous_close is not None else parts[0].open
    trades = [p.trades for p in parts]
    return Candle(
        candle_time=bucket_time,
        open=open_,
        high=high,
        low=low,
        close=close,
        volume=sum((p.volume for p in parts), Decimal(0)),
        quote_volume=_sum_known([p.quote_volume for p in parts]),
        trades=None if any(n is None for n in trades) else sum(n for n in trades if n is not None),
        taker_buy_base=_sum_known([p.taker_buy_base for p in parts]),
        taker_buy_quote=_sum_known([p.taker_buy_quote for p in parts]),
    )


def derive_parts(
    bucket_time: int,
    expected: int,
    parts: Sequence[Part],
    previous_close: Decimal | None = None,
) -> DerivedCandle | None:
    """The bar of bucket ``bucket_time`` from its ``parts`` (sub-bars, ascending, distinct
    times); complete when all ``expected`` parts are there and each is complete. None for a
    bucket without parts (nothing to say about it)."""
    if not parts:
        return None
    candle = aggregate(bucket_time, [p.candle for p in parts], previous_close)
    complete = len({p.candle.candle_time for p in parts}) == expected and all(
        p.complete for p in parts
    )
    return DerivedCandle(candle, complete)


def derive_bucket(
    bucket_time: int,
    timeframe: Timeframe,
    minutes: Sequence[Candle],
    previous_close: Decimal | None = None,
) -> DerivedCandle | None:
    """Aggregate the base ``minutes`` of bucket ``bucket_time`` (ascending, inside it)."""
    end = timeframe.next_open(bucket_time)
    assert all(bucket_time <= m.candle_time < end for m in minutes), "minute outside bucket"
    return derive_parts(
        bucket_time, timeframe.minutes_in(bucket_time), [Part(m) for m in minutes], previous_close
    )


def derive_forming(
    timeframe: Timeframe,
    stored_minutes: Sequence[Candle],
    forming: Candle,
    previous_close: Decimal | None = None,
    phase: int = 0,
) -> Candle | None:
    """The forming derived candle: the bucket's stored minutes plus the forming base candle."""
    bucket = timeframe.floor(forming.candle_time, phase)
    minutes = [m for m in stored_minutes if bucket <= m.candle_time < forming.candle_time]
    derived = derive_bucket(bucket, timeframe, [*minutes, forming], previous_close)
    return None if derived is None else derived.candle


def derive_series(
    timeframe: Timeframe,
    minutes: Sequence[Candle],
    *,
    complete_only: bool = True,
    phase: int = 0,
    listed: int | None = None,
) -> list[DerivedCandle]:
    """Derive every bucket of a run of minutes (strictly ascending: distinct times) for tests,
    benchmarks and replays: one pass that cuts the run at bucket ends (a bisection each) and
    aggregates each piece. ``listed``: the symbol's listing minute (Binance has none before
    it), at or before the first minute: the bucket holding it is complete with every minute
    from there, as Binance's first bar of a listing (``pipeline/bars.py``)."""
    result: list[DerivedCandle] = []
    previous_close: Decimal | None = None
    times = [m.candle_time for m in minutes]
    count = len(times)
    length = timeframe.seconds
    # fixed lengths: floor by arithmetic, from any one open time modulo the length
    offset = timeframe.floor(length * 1000, phase) % length if timeframe.fixed else None
    i = 0
    while i < count:
        t = times[i]
        if offset is None:
            bucket = timeframe.floor(t, phase)
            end = timeframe.next_open(bucket)
        else:
            bucket = t - (t - offset) % length
            end = bucket + length
        j = bisect.bisect_left(times, end, i + 1)
        start = listed if i == 0 and listed is not None and bucket <= listed <= t else bucket
        complete = j - i == (end - start) // MINUTE
        piece = minutes[i:j]
        if complete or not complete_only:
            result.append(DerivedCandle(aggregate(bucket, piece, previous_close), complete))
        previous_close = piece[-1].close
        i = j
    return result


def parts_in(source: Timeframe, timeframe: Timeframe, bucket_time: int) -> int:
    """How many ``source`` bars make up the ``timeframe`` bucket opening at ``bucket_time``."""
    assert source.fixed, "a month is never a part"
    return (timeframe.next_open(bucket_time) - bucket_time) // source.seconds


def plan_bars(
    old: dict[int, StoredCandle], bars: Sequence[tuple[Candle, bool]]
) -> tuple[list[UpsertOutcome], list[StoredCandle]]:
    """Each derived bar (with whether it is complete) planned against the stored rows ``old``
    of its runs (:func:`plan_upsert`): the outcomes, and the rows to write. With nothing
    stored (the import's history) each is new, without a call a bar."""
    if not old:
        # (tuple.__new__: the named tuple's own Python __new__ costs twice as much)
        return [UpsertOutcome.NEW] * len(bars), [
            tuple.__new__(StoredCandle, (c, "derived", done)) for c, done in bars
        ]
    outcomes: list[UpsertOutcome] = []
    writes: list[StoredCandle] = []
    for candle, complete in bars:
        outcome, row = plan_upsert(old.get(candle.candle_time), candle, "derived", complete)
        outcomes.append(outcome)
        if row is not None:
            writes.append(row)
    return outcomes, writes


__all__ = [
    "DerivedCandle",
    "Part",
    "aggregate",
    "aggregate_reference",
    "derivation_sources",
    "derive_bucket",
    "derive_forming",
    "derive_parts",
    "derive_series",
    "parts_in",
    "plan_bars",
]
