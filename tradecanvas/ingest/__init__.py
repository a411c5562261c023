"""Binance frames → closed candles in order, along the data flow:
tracker and batcher (pure) → core (pure, every decision) → loop (trio shell) → supervisor.

Imports nothing itself, so ``tradecanvas.ingest.core`` loads without trio.
"""
