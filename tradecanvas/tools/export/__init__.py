"""``tradecanvas export SERIES --from T --to T [--format csv] [--out FILE]``: a series' stored
candles in Binance's archive CSV layout (DESIGN §8).

Writes the 12 columns of ``data.binance.vision`` kline files (times in milliseconds, no header
unless ``--header``; extras the store lacks as 0), so that ``tradecanvas import --series SERIES
FILE`` of the output stores the same candles: ``import(export(x))`` is the identity (a
property test checks it). ``--to`` is exclusive. The store is the flags' (the SQLite file, or
PostgreSQL with ``TRADE_CANVAS_DATABASE_URL``); it is only read.
"""

from __future__ import annotations

from tradecanvas.tools.export.cli import EXIT_CODES, configure_parser, export_csv, run_export

__all__ = ["EXIT_CODES", "configure_parser", "export_csv", "run_export"]
