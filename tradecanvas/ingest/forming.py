"""The forming bars of a series' derived timeframes (pure): built from one forming base
candle and the bucket's recent minutes (:class:`~tradecanvas.ingest.batcher.MinuteCache`).

**A bucket begun before the stored history gets none.** When the series' stored history
starts inside a bucket (an empty store's initial backfill from a minute that is not
bucket-aligned: the 1w and 1M buckets, usually the 1d one too), Binance's bar holds minutes
the store never had, so a bar from ours would be wrong — a lower volume, another open, a
missing low — and no closed bar would ever replace it on a chart. The commit path leaves
such a bucket out for the same reason (``BatchCommit._bar`` in
:mod:`tradecanvas.pipeline.apply`), so the series gets neither a forming nor a closed bar of
it; the next bucket is whole. The history starts at the series' first minute stored or
queued for the store (:meth:`MinuteCache.history_start`), or at the forming minute itself
when nothing is; history another process stores below it (``tradecanvas backfill`` or
``import`` beside the daemon) counts once its ``factor.rebuild`` reaches the loop
(:mod:`~tradecanvas.ingest.history_refresh`). A bucket whose first
minutes are missing *inside* the history (absent at the exchange) is a bar of the minutes
there, forming as when it closes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from tradecanvas.ingest.batcher import MinuteCache
from tradecanvas.model import Candle, SeriesId, Timeframe
from tradecanvas.pipeline.derive import derive_forming


def derived_forming(
    minutes: MinuteCache,
    sid: SeriesId,
    timeframes: Sequence[Timeframe],
    candle: Candle,
    phase: int | None,
) -> Iterator[tuple[str, Candle]]:
    """``(series_id, forming bar)`` of each of ``timeframes`` (in order) for the forming base
    ``candle`` of ``sid``. A phased timeframe (3d) needs the symbol's ``phase`` (seconds):
    without it, none is built; nor one for a bucket begun before the stored history."""
    t = candle.candle_time
    history = minutes.history_start(sid)
    first = t if history is None else history
    if history is not None and minutes.starts_at_listing(sid):
        first = 0  # the listing's buckets: Binance's bars of the minutes from it on
    for tf in timeframes:
        tf_phase = phase if tf.phased else 0
        if tf_phase is None or tf.floor(t, tf_phase) < first:
            continue
        stored, previous_close = minutes.bucket_part(sid, tf, t, tf_phase)
        derived = derive_forming(tf, stored, candle, previous_close, tf_phase)
        if derived is not None:
            yield str(sid.with_timeframe(tf)), derived


__all__ = ["derived_forming"]
