"""Connections to Binance:
the WebSocket client, the connection plan, the REST client and its rate limits.
"""
