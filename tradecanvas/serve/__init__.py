"""Subscribers and HTTP: the subscriber queue, the hub, /ws/market and the HTTP API."""
