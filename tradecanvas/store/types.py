"""What the store holds and answers, as plain data (no I/O): shared by every backend and by
the pipeline, which must not load a database driver to name an outcome."""

from __future__ import annotations

import enum
from typing import Literal

import attrs

from tradecanvas.model import Candle

Source = Literal["ws", "rest", "http", "derived"]


class UpsertOutcome(enum.Enum):
    NEW = "new"
    UNCHANGED = "unchanged"
    REVISED = "revised"


@attrs.frozen
class StoredCandle:
    candle: Candle
    source: Source
    complete: bool


@attrs.frozen
class SeriesHead:
    series_id: str
    head_time: int
    first_time: int
    count: int


@attrs.frozen
class StoredEvent:
    """One entry of the event log: ``data`` is the JSON object sent as the message's data."""

    event_id: int
    series_id: str
    event: str
    data: dict[str, object]
    created_at: float
