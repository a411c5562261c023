"""levels.py's bucket arithmetic against the timeframes' own (the general rule)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.model import DAY, MINUTE, Timeframe
from tradecanvas.pipeline.levels import DerivationPlan, buckets_of

PLAN = DerivationPlan.of(
    [Timeframe.parse(t) for t in ("5m", "15m", "1h", "4h", "1d", "3d", "1w", "1M")]
)


@given(
    st.lists(st.integers(0, 4_000_000), min_size=1, max_size=300, unique=True),
    st.sampled_from([0, DAY, 2 * DAY]),
)
def test_buckets_of_equals_a_floor_per_time(minutes: list[int], phase: int) -> None:
    """One floor per bucket (arithmetic on a fixed grid) finds the buckets of every time."""
    times = sorted(1_600_000_000 - 1_600_000_000 % MINUTE + m * MINUTE for m in minutes)
    for level in PLAN.levels:
        p = phase if level.tf.phased else 0
        assert buckets_of(level, p, times) == {level.tf.floor(t, p) for t in times}
