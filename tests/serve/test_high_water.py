"""RecentHighWater (``serve/high_water.py``): a peak stays for one to two windows, then the
gauge tells the present again; plain data, time passed in."""

from __future__ import annotations

import pytest

from tradecanvas.serve.high_water import RecentHighWater


def test_a_peak_stays_through_the_next_window_and_is_gone_after_it() -> None:
    hw = RecentHighWater(60.0)
    assert hw.peak(0.0) == 0
    hw.note(7, 10.0)
    hw.note(3, 50.0)
    assert hw.peak(59.9) == 7
    assert hw.peak(60.0) == 7  # the window before still counts
    hw.note(2, 100.0)
    assert hw.peak(119.9) == 7
    assert hw.peak(120.0) == 2  # 7 was two windows back
    assert hw.peak(180.0) == 0


def test_after_a_silence_of_several_windows_nothing_old_is_shown() -> None:
    hw = RecentHighWater(60.0)
    hw.note(9, 5.0)
    assert hw.peak(300.0) == 0  # not the window just before: nothing carried over
    hw.note(4, 301.0)
    assert hw.peak(361.0) == 4


def test_the_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        RecentHighWater(0.0)
