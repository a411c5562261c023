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

from collections.abc import Sequence
from decimal import Decimal

import attrs

from tradecanvas.model import Candle, Timeframe, derivation_sources


@attrs.frozen
class DerivedCandle:
    candle: Candle
    complete: bool  # every base minute of the bucket was present


@attrs.frozen
class Part:
    """A bar being summed into a larger one, with its own completeness."""

    candle: Candle
    complete: bool = True


def _sum_known(values: Sequence[Decimal | None]) -> Decimal | None:
    if not values or any(v is None for v in values):
        return None
    return sum((v for v in values if v is not None), Decimal(0))


def aggregate(
    bucket_time: int, parts: Sequence[Candle], previous_close: Decimal | None = None
) -> Candle:
    """One bar from ``parts`` (ascending, non-empty, all inside the bucket)."""
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
) -> list[DerivedCandle]:
    """Derive every bucket of an ascending run of minutes (tests, benchmarks, replays)."""
    result: list[DerivedCandle] = []
    previous_close: Decimal | None = None
    i = 0
    while i < len(minutes):
        bucket = timeframe.floor(minutes[i].candle_time, phase)
        end = timeframe.next_open(bucket)
        j = i
        while j < len(minutes) and minutes[j].candle_time < end:
            j += 1
        derived = derive_bucket(bucket, timeframe, minutes[i:j], previous_close)
        if derived is not None and (derived.complete or not complete_only):
            result.append(derived)
        previous_close = minutes[j - 1].close
        i = j
    return result


def parts_in(source: Timeframe, timeframe: Timeframe, bucket_time: int) -> int:
    """How many ``source`` bars make up the ``timeframe`` bucket opening at ``bucket_time``."""
    assert source.fixed, "a month is never a part"
    return (timeframe.next_open(bucket_time) - bucket_time) // source.seconds


__all__ = [
    "DerivedCandle",
    "Part",
    "aggregate",
    "derivation_sources",
    "derive_bucket",
    "derive_forming",
    "derive_parts",
    "derive_series",
    "parts_in",
]
