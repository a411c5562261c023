"""tradecanvas: a trio daemon that ingests Binance klines, stores them, derives higher
timeframes and re-publishes everything to local subscribers over ``/ws/market``."""

from __future__ import annotations

from typing import Final

from tradecanvas.ops.build import VERSION

__version__: Final = VERSION
