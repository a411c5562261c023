"""An edge configured with series the ingest does not serve is told so at start-up."""

from __future__ import annotations

import orjson

from tradecanvas.bus.roles import unserved_by_ingest

BTC = ["binance:futures:BTC/USDT:1m", "binance:futures:BTC/USDT:5m"]
ETH = "binance:futures:ETH/USDT:1m"


def test_the_edges_series_outside_the_ingests_record() -> None:
    record = orjson.dumps(BTC).decode()
    assert unserved_by_ingest([*BTC, ETH], record) == [ETH]
    assert unserved_by_ingest(BTC[:1], record) == []


def test_no_record_yet_or_a_bad_one_warns_of_nothing() -> None:
    assert unserved_by_ingest([ETH], None) == []
    assert unserved_by_ingest([ETH], "not json") == []
