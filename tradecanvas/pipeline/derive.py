"""Binance-exact derivation of higher timeframes from 1m candles (DESIGN §4). Sans-IO.

The rule, checked against Binance's own 5m bars in ``tests/test_derive.py``: open, high and
low come from the minutes that traded (volume > 0) — Binance's bar ignores empty minutes —
close is the last minute's close, volumes and counts are summed; a bucket whose minutes are
all empty is flat at the previous close with volume 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

import attrs

from tradecanvas.model import MINUTE, Candle, Timeframe


@attrs.frozen
class DerivedCandle:
    candle: Candle
    complete: bool  # every base minute of the bucket was present


def _sum_known(values: Sequence[Decimal | None]) -> Decimal | None:
    if not values or any(v is None for v in values):
        return None
    return sum((v for v in values if v is not None), Decimal(0))


def derive_bucket(
    bucket_time: int,
    timeframe: Timeframe,
    minutes: Sequence[Candle],
    previous_close: Decimal | None = None,
) -> DerivedCandle | None:
    """Aggregate the base ``minutes`` of bucket ``bucket_time`` (ascending, inside the bucket).

    Returns None for a bucket with no minutes at all (nothing to say about it).
    """
    if not minutes:
        return None
    end = bucket_time + timeframe.seconds
    assert all(bucket_time <= m.candle_time < end for m in minutes), "minute outside bucket"
    traded = [m for m in minutes if m.volume > 0]
    if traded:
        open_ = traded[0].open
        high = max(m.high for m in traded)
        low = min(m.low for m in traded)
    else:
        flat = previous_close if previous_close is not None else minutes[0].open
        open_ = high = low = flat
    trades = [m.trades for m in minutes]
    candle = Candle(
        candle_time=bucket_time,
        open=open_,
        high=high,
        low=low,
        close=minutes[-1].close if traded else open_,
        volume=sum((m.volume for m in minutes), Decimal(0)),
        quote_volume=_sum_known([m.quote_volume for m in minutes]),
        trades=None if any(n is None for n in trades) else sum(n for n in trades if n is not None),
        taker_buy_base=_sum_known([m.taker_buy_base for m in minutes]),
        taker_buy_quote=_sum_known([m.taker_buy_quote for m in minutes]),
    )
    complete = len({m.candle_time for m in minutes}) == timeframe.seconds // MINUTE
    return DerivedCandle(candle, complete)


def derive_forming(
    timeframe: Timeframe,
    stored_minutes: Sequence[Candle],
    forming: Candle,
    previous_close: Decimal | None = None,
) -> Candle | None:
    """The forming derived candle: the bucket's stored minutes plus the forming base candle."""
    bucket = timeframe.floor(forming.candle_time)
    minutes = [m for m in stored_minutes if m.candle_time < forming.candle_time]
    derived = derive_bucket(bucket, timeframe, [*minutes, forming], previous_close)
    return None if derived is None else derived.candle


def derive_series(
    timeframe: Timeframe, minutes: Sequence[Candle], *, complete_only: bool = True
) -> list[DerivedCandle]:
    """Derive every bucket of an ascending run of minutes (tests, benchmarks, replays)."""
    result: list[DerivedCandle] = []
    previous_close: Decimal | None = None
    i = 0
    while i < len(minutes):
        bucket = timeframe.floor(minutes[i].candle_time)
        j = i
        while j < len(minutes) and minutes[j].candle_time < bucket + timeframe.seconds:
            j += 1
        derived = derive_bucket(bucket, timeframe, minutes[i:j], previous_close)
        if derived is not None and (derived.complete or not complete_only):
            result.append(derived)
        previous_close = minutes[j - 1].close
        i = j
    return result
