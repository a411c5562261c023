"""Fixtures of the tools' tests."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest


@pytest.fixture
def gc_restored() -> Iterator[None]:
    """The cyclic garbage collector left as the test found it, whatever the test did."""
    was = gc.isenabled()
    yield
    if was:
        gc.enable()
    else:
        gc.disable()
