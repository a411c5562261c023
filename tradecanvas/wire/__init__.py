"""Bytes and JSON ↔ model:
Binance frames and REST payloads, /ws/market messages, kline CSV. No I/O.
"""
