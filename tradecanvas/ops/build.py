"""The release this is (``tradecanvas --version``, the ready line, ``tradecanvas_build_info``).
Kept equal to setup.cfg's ``version`` (tests/test_upgrade_version.py checks it); here, low in
the stages, so that the daemon can name it without importing the package's top."""

from __future__ import annotations

from typing import Final

VERSION: Final = "0.1.0"
