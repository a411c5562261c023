"""HistoryChanges (pure): another process's ``factor.rebuild`` events reach the ingest loop
that owns their series — a derived series' event its base series' loop — and nothing else
does. The refresh itself, end to end (``serve`` and ``backfill`` beside it), is in
tests/store_pg/test_import_live.py."""

from __future__ import annotations

from tests.ingest.driver import BTC, ETH
from tradecanvas.ingest.history_refresh import HistoryChanges
from tradecanvas.model import SeriesId
from tradecanvas.store.types import StoredEvent

SPOT_BTC = SeriesId.parse("binance:spot:BTC/USDT:1m")


def event(series_id: str, kind: str = "factor.rebuild") -> StoredEvent:
    return StoredEvent(1, series_id, kind, {"reason": "import"}, 0.0)


def test_a_rebuild_reaches_the_loop_of_its_symbol_only() -> None:
    changes = HistoryChanges()
    with changes.watching([BTC, ETH]) as futures, changes.watching([SPOT_BTC]) as spot:
        changes.note_events(
            [
                event("binance:futures:ETH/USDT:5m"),  # a derived series: its base's loop
                event("binance:futures:BTC/USDT:1m"),
                event("binance:futures:ETH/USDT:1m"),
                event("binance:futures:SOL/USDT:1m"),  # nobody's
                event("binance:futures:BTC/USDT:1m", "gap"),  # not a history change
                event("not a series"),
            ]
        )
        assert futures.take() == [ETH, BTC] and futures.take() == []
        assert spot.take() == []
        changes.note_events([event("binance:spot:BTC/USDT:1d")])
        assert spot.take() == [SPOT_BTC] and futures.take() == []
    changes.note_events([event("binance:futures:BTC/USDT:1m")])  # no loop watches: nothing
    assert futures.take() == []
