"""Klines as columns (``tradecanvas.wire.kline_columns``): to and from candles, and the
slot-by-slot build."""

from __future__ import annotations

from decimal import Decimal

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.model import Candle
from tradecanvas.wire.kline_columns import KlineColumns, _plain_attrs_class, build

candle_values = st.builds(
    Candle,
    st.integers(0, 2**40),
    *[st.decimals(allow_nan=False, allow_infinity=False)] * 5,
    st.none() | st.decimals(allow_nan=False, allow_infinity=False),
    st.none() | st.integers(0, 10**9),
    st.none() | st.decimals(allow_nan=False, allow_infinity=False),
    st.none() | st.decimals(allow_nan=False, allow_infinity=False),
)


@given(st.lists(candle_values, max_size=5))
def test_candles_built_by_column_are_those_of_the_constructor(candles: list[Candle]) -> None:
    """``build`` sets each slot by a ``map`` of its setter: the same candles as
    ``Candle(...)``, the same objects in every field, frozen like them."""
    fields = [f.name for f in attrs.fields(Candle)]
    columns = [[getattr(c, name) for c in candles] for name in fields]
    built = build(len(candles), *columns)
    assert built == candles == list(map(Candle, *columns))
    for made, given_ in zip(built, candles, strict=True):
        assert type(made) is Candle
        assert all(getattr(made, name) is getattr(given_, name) for name in fields)
        with pytest.raises(attrs.exceptions.FrozenInstanceError):
            made.open = Decimal(1)  # type: ignore[misc]


def test_slots_are_set_directly_only_for_a_plain_attrs_class() -> None:
    """The setters are used only while ``Candle.__init__`` would do nothing else; a class
    whose ``__init__`` validates, converts or runs a hook is built by its constructor."""
    assert _plain_attrs_class(Candle)

    @attrs.frozen
    class Checked:
        value: int = attrs.field(validator=attrs.validators.instance_of(int))

    @attrs.frozen
    class Converted:
        value: int = attrs.field(converter=int)

    @attrs.frozen
    class Hooked:
        value: int

        def __attrs_post_init__(self) -> None:
            pass

    @attrs.define(slots=False)
    class NoSlots:
        value: int

    assert not any(map(_plain_attrs_class, (Checked, Converted, Hooked, NoSlots)))


@given(st.lists(candle_values, max_size=6), st.integers(0, 6))
def test_columns_hold_the_candles_they_were_made_of(candles: list[Candle], cut: int) -> None:
    """Candles → columns → candles is the identity, and taking, slicing and extending work
    row by row."""
    columns = KlineColumns.of_candles(candles)
    assert len(columns) == len(candles)
    assert columns.candles() == candles
    assert columns.slice(cut, len(candles)).candles() == candles[cut:]
    head = columns.take(cut)
    assert head.candles() == candles[:cut]
    assert columns.candles() == candles[cut:]
    head.extend(columns)
    assert head.candles() == candles
    known = all(
        None not in (c.quote_volume, c.trades, c.taker_buy_base, c.taker_buy_quote) for c in candles
    )
    assert head.all_known() == known
