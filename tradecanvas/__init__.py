"""tradecanvas: a trio daemon that ingests Binance klines, stores them, derives higher
timeframes and re-publishes everything to local subscribers over ``/ws/market``."""

from __future__ import annotations

__version__ = "0.1.0"
