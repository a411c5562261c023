"""System events and the rules that raise them (DESIGN §4, §10). Plain data, no I/O.

Every event is written to the store's event log in the transaction that commits the candles
it concerns, which gives it its ``event_id`` (one strictly increasing sequence for the store);
it is then published to subscribers with that id and can be read again by cursor
(``events_after``, ``GET /api/market/events``).

========================  ==================================================================
event                     raised when
========================  ==================================================================
``factor.rebuild``        a series' stored history changed: ``reason`` is ``new_series``
                          (first candles), ``backfill`` (inserted below the head),
                          ``revision`` (a stored bar changed, or a derived bar its base left
                          incomplete became complete) or ``fingerprint`` (derivation settings
                          changed)
``gap``                   candles the store will not have: ``exchange`` (base minutes Binance
                          REST confirmed missing) or ``incomplete`` (a derived bar its base
                          could not complete; a later ``factor.rebuild`` ``revision`` of that
                          bar withdraws it)
``series.added``          a series is served that was not before (``configured``)
``series.removed``        a series is no longer served (``unconfigured``)
========================  ==================================================================

``data`` is always ``{series_id, reason, from_time, to_time}``: the range of ``candle_time``
values concerned, inclusive (null for the series events).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

import attrs

from tradecanvas.model import Candle
from tradecanvas.store.types import StoredEvent, UpsertOutcome

FACTOR_REBUILD: Final = "factor.rebuild"
GAP: Final = "gap"
SERIES_ADDED: Final = "series.added"
SERIES_REMOVED: Final = "series.removed"
EVENT_KINDS: Final = (FACTOR_REBUILD, GAP, SERIES_ADDED, SERIES_REMOVED)


@attrs.frozen
class SystemEvent:
    """A ``system`` message; ``event_id`` is set once it is in the event log."""

    series_id: str
    reason: str
    from_time: int | None
    to_time: int | None
    event: str = FACTOR_REBUILD
    event_id: int | None = None

    @property
    def message(self) -> str:
        span = f"{self.from_time}..{self.to_time}"
        if self.event == GAP:
            why = (
                "missing at the exchange"
                if self.reason == "exchange"
                else "its base series cannot complete it"
            )
            return f"{self.series_id}: no complete candles in {span} ({why})"
        if self.event == SERIES_ADDED:
            return f"{self.series_id} is now served"
        if self.event == SERIES_REMOVED:
            return f"{self.series_id} is no longer served"
        return (
            f"{self.series_id}: stored history changed ({self.reason}, {span});"
            " recompute anything derived from it"
        )

    @property
    def data(self) -> dict[str, object]:
        return {
            "series_id": self.series_id,
            "reason": self.reason,
            "from_time": self.from_time,
            "to_time": self.to_time,
        }

    def to_wire(self) -> dict[str, object]:
        wire: dict[str, object] = {
            "type": "system",
            "series_id": self.series_id,
            "event": self.event,
            "message": self.message,
            "data": self.data,
        }
        if self.event_id is not None:
            wire["event_id"] = self.event_id
        return wire

    @classmethod
    def from_stored(cls, stored: StoredEvent) -> SystemEvent:
        data: Mapping[str, object] = stored.data
        return cls(
            series_id=stored.series_id,
            reason=str(data.get("reason", "")),
            from_time=_int_or_none(data.get("from_time")),
            to_time=_int_or_none(data.get("to_time")),
            event=stored.event,
            event_id=stored.event_id,
        )


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def rebuild_events_for(
    series_id: str,
    previous_head: int | None,
    candles: Sequence[Candle],
    outcomes: Sequence[UpsertOutcome],
    completed: Sequence[int] = (),
) -> list[SystemEvent]:
    """The ``factor.rebuild`` events one upsert of a series calls for; ``completed``: times of
    derived bars that were stored incomplete and are complete now (their ``gap`` is
    withdrawn)."""
    new = [c.candle_time for c, o in zip(candles, outcomes, strict=True) if o is UpsertOutcome.NEW]
    revised = [
        c.candle_time for c, o in zip(candles, outcomes, strict=True) if o is UpsertOutcome.REVISED
    ]
    revised = sorted({*revised, *completed})
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


def gap_event(series_id: str, reason: str, from_time: int, to_time: int) -> SystemEvent:
    return SystemEvent(series_id, reason, from_time, to_time, event=GAP)


def served_series_events(previously: Sequence[str] | None, now: Sequence[str]) -> list[SystemEvent]:
    """``series.added`` / ``series.removed`` for a change of the served set (``previously``
    None: a new store, where every series is added)."""
    before, after = set(previously or ()), set(now)
    added = [SystemEvent(s, "configured", None, None, SERIES_ADDED) for s in sorted(after - before)]
    removed = [
        SystemEvent(s, "unconfigured", None, None, SERIES_REMOVED) for s in sorted(before - after)
    ]
    return added + removed
