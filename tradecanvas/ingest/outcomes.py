"""What :class:`~tradecanvas.ingest.core.IngestCore` hands back to its trio shell: plain
frozen values (a malformed frame, what a frame, a REST answer or a fill plan asks of the
shell, a batch to commit)."""

from __future__ import annotations

from typing import Final

import attrs

from tradecanvas.ingest.batcher import BatchItem, Holes
from tradecanvas.ingest.tracker import FillRequest
from tradecanvas.model import Candle, SeriesId


@attrs.frozen
class Malformed:
    """A frame dropped as malformed: count it under ``reason``; log it when ``first``."""

    reason: str
    detail: str
    first: bool  # the first of its kind on this loop


@attrs.frozen
class FrameOutcome:
    """What one frame asks of the shell."""

    # publish (with forming_updates): the frame's own, or held ones it released
    forming: tuple[tuple[SeriesId, Candle], ...] = ()
    malformed: Malformed | None = None
    wake_fills: bool = False  # the fill task has something new to look at
    wake_committer: bool = False  # closed candles were queued


# the outcomes without forming candles or a malformed frame, shared (FrameOutcome is frozen):
# most frames end in one, and building one costs a few % of the daemon's CPU at full speed
PLAIN_OUTCOMES: Final = {
    (fills, committer): FrameOutcome(wake_fills=fills, wake_committer=committer)
    for fills in (False, True)
    for committer in (False, True)
}


@attrs.frozen
class FillPlan:
    """What :meth:`IngestCore.next_fills` decided."""

    start: tuple[tuple[SeriesId, FillRequest], ...]  # fetch these now (marked in flight)
    wake_at: float  # look again at this monotonic time at the latest (inf: on a wake-up)
    # held candles committed over their hole because REST kept failing: (series, count)
    forced: tuple[tuple[SeriesId, int], ...] = ()


@attrs.frozen
class FillOutcome:
    """What one REST answer released."""

    rest_released: int  # candles from REST queued for commit
    repaired: int  # of them, closes that did not arrive while connected (late_close, hole)
    absent: int  # minutes REST confirmed missing at the exchange
    wake_committer: bool
    # store these unresolved holes now: a retry settled them and no queued candle of the
    # series will carry the record (None: nothing to store)
    save_holes: Holes | None = None
    # held forming candles that may go out now (publish them with forming_updates)
    forming: tuple[tuple[SeriesId, Candle], ...] = ()


@attrs.frozen
class CommitBatch:
    """Closed candles for one ``IngestPipeline.run``, all of one source."""

    items: tuple[BatchItem, ...]
    wake_fills: bool  # fills paused for the commit backlog may go on once this is taken
