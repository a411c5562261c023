"""Klines as columns: one list a field, the rows in order (what the archive's short parse
makes, and what ``tradecanvas import`` commits on its short way without a ``Candle`` a row).
Plain data, no I/O."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal
from itertools import repeat
from operator import attrgetter, is_
from typing import Any, Final, final

import attrs

from tradecanvas.model import Candle

# Candle's fields, in the order of its __init__'s arguments (and of KlineColumns')
FIELDS: Final = (
    "candle_time",
    "open",
    "high",
    "low",
    "close",
    "volume",
    "quote_volume",
    "trades",
    "taker_buy_base",
    "taker_buy_quote",
)


@final
@attrs.frozen
class KlineColumns:
    """Klines, each field a list (``times`` the open times, ascending as given). The lists
    are the object's own: nothing else holds them."""

    times: list[int]
    open: list[Decimal]
    high: list[Decimal]
    low: list[Decimal]
    close: list[Decimal]
    volume: list[Decimal]
    quote_volume: list[Decimal | None]
    trades: list[int | None]
    taker_buy_base: list[Decimal | None]
    taker_buy_quote: list[Decimal | None]

    @classmethod
    def empty(cls) -> KlineColumns:
        return cls([], [], [], [], [], [], [], [], [], [])

    @classmethod
    def of_candles(cls, candles: Sequence[Candle]) -> KlineColumns:
        columns: list[list[Any]] = [list(map(attrgetter(name), candles)) for name in FIELDS]
        return cls(*columns)

    def columns(self) -> tuple[list[Any], ...]:
        """The ten lists, in ``FIELDS`` order (the object's own: changing one changes it)."""
        return _COLUMNS(self)

    def __len__(self) -> int:
        return len(self.times)

    def candles(self) -> list[Candle]:
        """A ``Candle`` a row."""
        return build(len(self.times), *self.columns())

    def extend(self, other: KlineColumns) -> None:
        """``other``'s rows after these."""
        for mine, theirs in zip(self.columns(), other.columns(), strict=True):
            mine += theirs

    def take(self, count: int) -> KlineColumns:
        """The first ``count`` rows, taken out."""
        taken: list[list[Any]] = []
        for column in self.columns():
            taken.append(column[:count])
            del column[:count]
        return KlineColumns(*taken)

    def slice(self, start: int, stop: int) -> KlineColumns:
        columns: list[list[Any]] = [column[start:stop] for column in self.columns()]
        return KlineColumns(*columns)

    def all_known(self) -> bool:
        """Every row knows all four extras (the quote volume, trades and taker volumes)."""
        extras = (self.quote_volume, self.trades, self.taker_buy_base, self.taker_buy_quote)
        # (by identity: ``None in`` a list of Decimals calls Decimal's == for each)
        return not any(any(map(is_, column, repeat(None))) for column in extras)


_COLUMNS: Final = attrgetter(*(f.name for f in attrs.fields(KlineColumns)))


def _plain_attrs_class(cls: type) -> bool:
    """True when ``cls``' attrs ``__init__`` does nothing but set each field's slot in turn
    (slots, no validator, converter, default factory run, post-init or setattr hook)."""
    return (
        "__slots__" in cls.__dict__
        and not hasattr(cls, "__attrs_pre_init__")
        and not hasattr(cls, "__attrs_post_init__")
        and all(
            f.validator is None
            and f.converter is None
            and f.init
            and f.on_setattr in (None, attrs.setters.NO_OP)
            and f.alias == f.name
            and type(cls.__dict__.get(f.name)).__name__ == "member_descriptor"
            for f in attrs.fields(cls)
        )
    )


# each Candle field's slot setter, in the order of its __init__'s arguments; empty when
# Candle's __init__ does more than set them (then build calls it)
_SETTERS: Final[tuple[Callable[[Candle, object], None], ...]] = (
    tuple(getattr(Candle, f.name).__set__ for f in attrs.fields(Candle))
    if _plain_attrs_class(Candle) and tuple(f.name for f in attrs.fields(Candle)) == FIELDS
    else ()
)


def build(count: int, *columns: Iterable[object]) -> list[Candle]:
    """``count`` Candles of ``columns`` (one a field, in the order of ``Candle``'s
    arguments): what ``list(map(Candle, *columns))`` gives, with each slot set by a
    ``map`` of its setter instead of ``Candle.__init__`` per row (attrs' frozen
    ``__init__`` sets the same slots one ``object.__setattr__`` call at a time, from
    Python: about 5,500 instructions a candle against 1,000)."""
    if not _SETTERS:
        return list(map(Candle, *columns))
    candles: list[Candle] = list(map(object.__new__, repeat(Candle, count)))
    for setter, column in zip(_SETTERS, columns, strict=True):
        deque(map(setter, candles, column), maxlen=0)
    return candles


__all__ = ["FIELDS", "KlineColumns", "build"]
