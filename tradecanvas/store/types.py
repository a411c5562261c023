"""What the store holds and answers, as plain data (no I/O): shared by every backend and by
the pipeline, which must not load a database driver to name an outcome."""

from __future__ import annotations

import enum
from typing import Literal, NamedTuple

import attrs

from tradecanvas.model import Candle

Source = Literal["ws", "rest", "http", "derived"]


class UpsertOutcome(enum.Enum):
    NEW = "new"
    UNCHANGED = "unchanged"
    REVISED = "revised"


class StoredCandle(NamedTuple):
    """A stored candle with where it came from and its ``complete`` mark. A named tuple,
    not a frozen attrs class: the pipeline makes one per row it writes, and it costs half
    as much to build."""

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


_EXTRAS = ("quote_volume", "trades", "taker_buy_base", "taker_buy_quote")


def plan_upsert(
    old: StoredCandle | None, candle: Candle, source: Source, complete: bool
) -> tuple[UpsertOutcome, StoredCandle | None]:
    """The rule every backend's upsert applies to one candle against the stored one (``old``,
    None when absent): the outcome, and the row to write (None: the stored row stays).

    Values are compared numerically, so ``1.0`` and ``1.00`` are the same price. An unchanged
    candle keeps its stored text and source, but gains extras it lacked and the newer
    ``complete`` mark. Shared so that a caller that knows ``old`` (the pipeline's recent bars)
    knows what the store holds afterwards without reading it back.
    """
    if old is None:
        return UpsertOutcome.NEW, StoredCandle(candle, source, complete)
    if not old.candle.same_values(candle):
        return UpsertOutcome.REVISED, StoredCandle(candle, source, complete)
    if old.complete != complete or _gains_extras(old.candle, candle):
        return UpsertOutcome.UNCHANGED, StoredCandle(
            _merge_extras(old.candle, candle), old.source, complete
        )
    return UpsertOutcome.UNCHANGED, None


def _gains_extras(old: Candle, new: Candle) -> bool:
    return any(getattr(old, n) is None and getattr(new, n) is not None for n in _EXTRAS)


def _merge_extras(old: Candle, new: Candle) -> Candle:
    return attrs.evolve(old, **{n: getattr(new, n) for n in _EXTRAS if getattr(old, n) is None})
