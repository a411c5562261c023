"""Candles and their records (holes, bans, fingerprints) behind one interface."""

from __future__ import annotations

from tradecanvas.store.sqlite import (
    SCHEMA_VERSION,
    CandleStore,
    SeriesHead,
    Source,
    StoredCandle,
    StoreTxn,
    UpsertOutcome,
)

__all__ = [
    "SCHEMA_VERSION",
    "CandleStore",
    "SeriesHead",
    "Source",
    "StoreTxn",
    "StoredCandle",
    "UpsertOutcome",
]
