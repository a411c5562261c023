"""The batch helpers the commit's fast paths use equal their plain definitions."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from tests.conftest import candle
from tradecanvas.model import Candle, SeriesId
from tradecanvas.pipeline.batch import (
    MAX_NAMED,
    SeriesNames,
    group_by_series,
    strictly_ascending,
)
from tradecanvas.pipeline.levels import series_order

SERIES = [SeriesId.parse(f"binance:spot:{b}/USDT:1m") for b in ("BTC", "ETH", "SOL")]

_pairs = st.lists(
    st.tuples(
        st.sampled_from(SERIES),
        st.integers(0, 20).map(lambda m: candle(60 * m, "1", "2", "1", "2")),
    ),
    max_size=30,
)


@given(_pairs)
def test_group_by_series_is_the_plain_grouping(pairs: list[tuple[SeriesId, Candle]]) -> None:
    plain: dict[SeriesId, list[Candle]] = {}
    for series, c in pairs:
        plain.setdefault(series, []).append(c)
    grouped = group_by_series(tuple(pairs))
    assert grouped == plain
    assert list(grouped) == list(plain)  # first met, first


def test_one_series_history_is_one_list_and_equal_series_objects_group_too() -> None:
    minutes = [candle(60 * m, "1", "2", "1", "2") for m in range(5)]
    assert group_by_series(tuple((SERIES[0], c) for c in minutes)) == {SERIES[0]: minutes}
    copies = [SeriesId.parse(str(SERIES[0])) for _ in minutes]  # equal, not the same object
    assert group_by_series(tuple(zip(copies, minutes, strict=True))) == {SERIES[0]: minutes}


@given(st.lists(st.integers(0, 10), max_size=12))
def test_strictly_ascending_is_the_plain_check(minutes: list[int]) -> None:
    candles = [candle(60 * m, "1", "2", "1", "2") for m in minutes]
    assert strictly_ascending(candles) == all(a < b for a, b in itertools.pairwise(minutes))


# equal SeriesIds that are distinct objects: SeriesNames keys by identity, the grouping by
# equality
COPIES = [SeriesId.parse(str(s)) for s in SERIES]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(SERIES + COPIES),
            st.integers(0, 20).map(lambda m: candle(60 * m, "1", "2", "1", "2")),
        ),
        max_size=8,
    )
)
def test_series_names_each_once_is_the_grouped_naming_or_declines(
    pairs: list[tuple[SeriesId, Candle]],
) -> None:
    """The live batch's naming (a pair a series, no grouping) gives exactly what the
    general one gives for the grouped pairs, and declines whenever a series (by equality,
    whatever the object) has two pairs."""
    names = SeriesNames()
    general = names.grouped(group_by_series(tuple(pairs)))
    once = names.each_once(tuple(pairs))
    if len({str(s) for s, _ in pairs}) < len(pairs):
        assert once is None
    else:
        assert once is not None
        assert [(o, sid, s, list(c)) for o, sid, s, c in once] == general
        assert [sid for _, sid, _, _ in general] == sorted(str(s) for s, _ in pairs)


def test_series_names_start_over_past_their_bound() -> None:
    names = SeriesNames()
    made = [SeriesId.parse(f"binance:spot:A{i}/USDT:1m") for i in range(MAX_NAMED + 1)]
    for series in made:
        assert names.of(series) == (series_order(series), str(series), series)
    assert names.of(made[0]) == names.of(SeriesId.parse(str(made[0])))
    assert len(names._by_object) <= MAX_NAMED
