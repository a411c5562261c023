"""The browser tests' fixtures (the rig itself: ``tests.browser.rig``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from playwright.sync_api import Browser

from tests.browser.rig import chromium


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium per test module (each test opens its own contexts)."""
    with chromium() as b:
        yield b
