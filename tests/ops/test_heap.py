"""The start-up heap frozen out of the cyclic collector's walks."""

from __future__ import annotations

import gc

from tradecanvas.ops.heap import freeze_startup_heap


def test_every_live_object_is_frozen_and_only_later_ones_are_walked() -> None:
    gc.unfreeze()
    try:
        walked_before = len(gc.get_objects())
        kept = [object(), {"a": [1]}]
        frozen = freeze_startup_heap()
        assert frozen == gc.get_freeze_count()
        assert frozen >= walked_before // 2  # the test session's modules, at least
        walked = gc.get_objects()  # what a full collection walks now
        assert not any(o is kept[1] for o in walked)
        later = {"b": [2]}
        assert any(o is later for o in gc.get_objects())
        assert len(gc.get_objects()) < walked_before // 10
    finally:
        gc.unfreeze()
