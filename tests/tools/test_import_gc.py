"""The import's transactions run with the cyclic GC paused, and leave it as they found it."""

from __future__ import annotations

import gc

import pytest

from tradecanvas.pipeline.commit import collector_paused

pytestmark = pytest.mark.usefixtures("gc_restored")


def test_paused_inside_and_enabled_after_even_on_an_error() -> None:
    gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), collector_paused():
        raise RuntimeError("rolled back")
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled() -> None:
    gc.disable()
    with collector_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
