"""The bar a due derived bucket gives (the rule of ``BatchCommit``, DESIGN §4), and a series'
*listing*: the minute before which Binance has none of it. Sans-IO but for the store meta
record of a listing.

A bucket whose last minute is settled gives, from its stored source bars:

- a complete bar when every source bar of the bucket is stored complete;
- an incomplete bar (``gap``) when one is missing or incomplete inside the stored history;
- no bar when the store's history starts inside the bucket (an initial backfill or an import
  from a minute that is not bucket-aligned): Binance's bar holds minutes the store never
  had, so a bar of ours would be wrong — another open, a lower volume — and would never be
  replaced;
- unless the series' listing lies inside it: Binance has no minute before the listing, and
  its own first bar of a listing is an ordinary bar of the minutes there (the bucket's open
  time, not the listing's; no gap). So is ours: complete when every source bar from the
  listing's on is stored complete, incomplete like any other when one is missing after it.

A listing is known only from Binance itself (``IngestBatch.listed``: an empty store's first
REST backfill found nothing before the symbol's first minute); a history that merely starts
late is not one.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable, Sequence
from typing import Final

from tradecanvas.errors import CandleError
from tradecanvas.model import MINUTE, Candle, SeriesId, Timeframe
from tradecanvas.pipeline.derive import aggregate, parts_in
from tradecanvas.pipeline.levels import Level
from tradecanvas.store.interface import WriteTxn
from tradecanvas.store.types import StoredCandle

# the store meta record of a base series' listing: "listed:{series_id}" → its minute
LISTING_KEY_PREFIX: Final = "listed:"
_volume_of: Final = operator.attrgetter("volume")


def listing_key(series_id: str) -> str:
    return f"{LISTING_KEY_PREFIX}{series_id}"


def record_listings(txn: WriteTxn, listed: Iterable[tuple[SeriesId, int]]) -> None:
    """Record each base series' listing minute, in the transaction of the batch that brings
    it. Not when the store holds a minute of the series below it: Binance had that one, so
    the claim is wrong (and the history's start is left to the usual rule)."""
    for series, t in listed:
        if series.timeframe.seconds != MINUTE:
            raise CandleError(f"{series} is not a base (1m) series; only 1m is ingested")
        if isinstance(t, bool) or not isinstance(t, int) or t < 0 or t % MINUTE:
            raise CandleError(f"the listing of {series} must be a minute's open time, got {t!r}")
        sid = str(series)
        first = txn.first_time(sid)
        if first is None or first >= t:
            txn.set_meta(listing_key(sid), str(t))


def read_listing(txn: WriteTxn, series_id: str) -> int | None:
    """The recorded listing minute of the base series ``series_id``, if any."""
    value = txn.get_meta(listing_key(series_id))
    return None if value is None else int(value)


def listing_start(source: Timeframe, bucket: int, first: int, listed: int | None) -> int | None:
    """The open time of the ``source`` bar holding the listing ``listed`` when the listing
    lies in the bucket opening at ``bucket`` at or before its first stored part (opening at
    ``first``): the bucket's history at Binance starts there. None otherwise."""
    if listed is None:
        return None
    start = source.floor(listed)  # (a source is never phased nor a month)
    return start if bucket <= start <= first else None


def bucket_bar(
    level: Level,
    bucket: int,
    end: int,
    candles: Sequence[Candle],
    all_complete: bool,
    head: int,
    before_of: Callable[[int], StoredCandle | None],
    listing_of: Callable[[], int | None],
) -> tuple[Candle, bool] | None:
    """The bar of bucket [``bucket``, ``end``) from its stored source bars (non-empty,
    ``all_complete``: each stored complete) and whether it is complete, or None when it is
    not to be stored (yet). ``head``: the base series is settled up to this minute;
    ``before_of(bucket)``: the stored source bar before the bucket; ``listing_of()``: the base
    series' listing minute (both asked only when needed)."""
    expected = level.parts or parts_in(level.source, level.tf, bucket)
    # the rows are the store's: distinct times, so complete means all there and complete
    complete = all_complete and len(candles) == expected
    if not complete and head < end - MINUTE:
        return None  # still filling; finalised once its last minute is settled
    all_empty = not any(map(_volume_of, candles))
    first = candles[0].candle_time
    before = None
    if all_empty or (not complete and first > bucket):
        before = before_of(bucket)
    if not complete and before is None and first > bucket:
        # the store's history starts inside this bucket: a bar only if Binance's does too
        start = listing_start(level.source, bucket, first, listing_of())
        if start is None:
            return None
        complete = all_complete and len(candles) == (end - start) // level.source.seconds
    # an all-empty bucket is flat at the previous close
    previous_close = before.candle.close if before is not None and all_empty else None
    return aggregate(bucket, candles, previous_close), complete


__all__ = [
    "LISTING_KEY_PREFIX",
    "bucket_bar",
    "listing_key",
    "listing_start",
    "read_listing",
    "record_listings",
]
