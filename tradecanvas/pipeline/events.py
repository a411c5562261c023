"""System events: ``factor.rebuild`` and the rule that decides when a series' stored history
changed enough to invalidate what consumers computed from it (DESIGN §4). Plain data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import attrs

from tradecanvas.model import Candle
from tradecanvas.store.sqlite import UpsertOutcome

FACTOR_REBUILD: Final = "factor.rebuild"


@attrs.frozen
class SystemEvent:
    """A ``system`` message: ``factor.rebuild`` with ``data = {series_id, reason, from_time,
    to_time}``."""

    series_id: str
    reason: str
    from_time: int
    to_time: int
    event: str = FACTOR_REBUILD

    @property
    def message(self) -> str:
        return (
            f"{self.series_id}: stored history changed ({self.reason},"
            f" {self.from_time}..{self.to_time}); recompute anything derived from it"
        )

    def to_wire(self) -> dict[str, object]:
        return {
            "type": "system",
            "series_id": self.series_id,
            "event": self.event,
            "message": self.message,
            "data": {
                "series_id": self.series_id,
                "reason": self.reason,
                "from_time": self.from_time,
                "to_time": self.to_time,
            },
        }


def rebuild_events_for(
    series_id: str,
    previous_head: int | None,
    candles: Sequence[Candle],
    outcomes: Sequence[UpsertOutcome],
) -> list[SystemEvent]:
    """The ``factor.rebuild`` events one upsert of a series calls for."""
    new = [c.candle_time for c, o in zip(candles, outcomes, strict=True) if o is UpsertOutcome.NEW]
    revised = [
        c.candle_time for c, o in zip(candles, outcomes, strict=True) if o is UpsertOutcome.REVISED
    ]
    events: list[SystemEvent] = []
    if new and previous_head is None:
        events.append(SystemEvent(series_id, "new_series", min(new), max(new)))
    elif new and previous_head is not None:
        below = [t for t in new if t < previous_head]
        if below:
            events.append(SystemEvent(series_id, "backfill", min(below), max(below)))
    if revised:
        events.append(SystemEvent(series_id, "revision", min(revised), max(revised)))
    return events
