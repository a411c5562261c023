"""Binance frames → closed candles in order:
the pure core, the batcher, the trio loop and its supervisor.
"""
