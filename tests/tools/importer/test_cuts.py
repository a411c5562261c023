"""``transaction_end``: an import's transactions end where no derived bucket goes on."""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.model import DAY, MINUTE, Timeframe
from tradecanvas.pipeline.levels import DerivationPlan, Level
from tradecanvas.tools.importer.cuts import MAX_TRANSACTION, transaction_end

START = int(datetime(2023, 1, 1, tzinfo=UTC).timestamp())  # a Sunday, midnight


def levels(*texts: str) -> list[tuple[Level, int]]:
    plan = DerivationPlan.of([Timeframe.parse(t) for t in texts])
    return [(level, 0) for level in plan.levels]


DEFAULT = levels("5m", "15m", "1h", "4h", "1d")
SUB_DAY = ("3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d")


def minutes(count: int, start: int = START) -> list[int]:
    return [start + MINUTE * i for i in range(count)]


def splits(times: list[int], end: int, of: list[tuple[Level, int]]) -> list[str]:
    """The timeframes with a bucket holding candles on both sides of ``end``."""
    if not 0 < end < len(times):
        return []
    return [
        level.tf.text for level, phase in of
        if level.floor(times[end], phase) <= times[end - 1]
    ]  # fmt: skip


def test_the_default_timeframes_end_at_the_last_midnight_before_the_batch() -> None:
    times = minutes(3 * 1440)
    end = transaction_end(times, 4000, DEFAULT, rest=False)
    assert end == 2880 and times[end] % DAY == 0


def test_a_bucket_longer_than_the_batch_waits_for_the_next_file_then_goes_whole() -> None:
    part = minutes(1000)
    assert transaction_end(part, 800, DEFAULT, rest=False) == 0
    assert transaction_end(part, 800, DEFAULT, rest=True) == 1000  # the files end there
    assert transaction_end(minutes(2000), 1000, DEFAULT, rest=False) == 1440
    # a file that ends with the day ends the transaction: no wait for the next one
    assert transaction_end(minutes(1440), 1000, DEFAULT, rest=False) == 1440


def test_week_and_month_with_no_common_boundary_in_reach_fall_back_to_the_week() -> None:
    # 2023: no Monday is the 1st of a month between February and May
    feb = int(datetime(2023, 2, 1, tzinfo=UTC).timestamp())
    times = minutes(MAX_TRANSACTION + 20_000, feb)
    chosen = levels("5m", "1d", "1w", "1M")
    end = transaction_end(times, 4000, chosen, rest=False)
    assert 0 < end <= MAX_TRANSACTION
    assert splits(times, end, chosen[:-1]) == [] and splits(times, end, chosen) == ["1M"]


def test_no_derived_timeframe_takes_the_batch() -> None:
    assert transaction_end(minutes(5000), 4000, [], rest=False) == 4000


@given(
    st.lists(st.sampled_from(SUB_DAY), min_size=1, unique=True),
    st.lists(st.integers(1, 400), min_size=1, max_size=40),
    st.integers(1, 3000),
    st.booleans(),
)
def test_no_bucket_is_cut_in_two(
    chosen: list[str], steps: list[int], batch: int, rest: bool
) -> None:
    """For any sub-day timeframes (they share midnight), history with holes and batch: the
    end is 0 (wait: only when more may come) or inside the queue, with no bucket split."""
    times, t = [], START
    for step in steps:
        t += step * MINUTE
        times.append(t)
    of = levels(*chosen)
    end = transaction_end(times, batch, of, rest=rest)
    if end == 0:
        assert not rest and len(times) <= MAX_TRANSACTION
        return
    assert 0 < end <= len(times)
    assert splits(times, end, of) == []
    if end > batch:  # grown to reach a boundary: there was none before the batch's end
        assert all(splits(times, k, of) for k in range(1, batch + 1))
