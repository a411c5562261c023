"""The connection plan (pure): stream URLs, connection groups, reconnect naming and backoff."""

from __future__ import annotations

import orjson
import pytest

from tradecanvas.model import SeriesId
from tradecanvas.ops import metrics
from tradecanvas.upstream.plan import (
    RECONNECT_REASONS,
    announces_server_shutdown,
    build_combined_stream_url,
    connection_groups,
    failures_after_end,
    reconnect_reason,
)


def test_stream_urls_for_futures_and_spot() -> None:
    futures = [
        SeriesId.parse("binance:futures:BTC/USDT:1m"),
        SeriesId.parse("binance:futures:ETH/USDT:USDT:1m"),
    ]
    assert [s.stream_name for s in futures] == ["btcusdt@kline_1m", "ethusdt@kline_1m"]
    url = build_combined_stream_url(
        "wss://fstream.binance.com/market", [s.stream_name for s in futures]
    )
    assert (
        url == "wss://fstream.binance.com/market/stream?streams=btcusdt@kline_1m/ethusdt@kline_1m"
    )
    spot = build_combined_stream_url("wss://stream.binance.com:9443/", ["btcusdt@kline_1m"])
    assert spot == "wss://stream.binance.com:9443/stream?streams=btcusdt@kline_1m"
    assert (
        build_combined_stream_url("http://127.0.0.1:9", ["a"])
        == "ws://127.0.0.1:9/stream?streams=a"
    )
    assert build_combined_stream_url("https://h/market", ["a"]).startswith("wss://h/market/stream")
    with pytest.raises(ValueError, match="at most 200"):
        build_combined_stream_url("wss://h", [f"s{i}" for i in range(201)])
    with pytest.raises(ValueError, match="no streams"):
        build_combined_stream_url("wss://h", [])
    with pytest.raises(ValueError, match="is not a ws://"):
        build_combined_stream_url("ftp://h", ["a"])
    many = [SeriesId.parse(f"binance:futures:C{i}/USDT:1m") for i in range(201)]
    spots = [SeriesId.parse("binance:spot:BTC/USDT:1m"), SeriesId.parse("binance:spot:ETH/BTC:1m")]
    groups = connection_groups([*many[:100], *spots, *many[100:]])
    assert [len(g) for g in groups] == [200, 1, 2]
    assert {s.market for s in groups[2]} == {"spot"}


def test_backoff_after_a_connection_ended() -> None:
    healthy = {"lived_s": 3600.0, "healthy_after_s": 60.0}
    short = {"lived_s": 0.5, "healthy_after_s": 60.0}
    # serverShutdown after a healthy hour: reconnect at once
    assert failures_after_end(3, shutdown_announced=True, **healthy) == 0
    assert failures_after_end(3, shutdown_announced=False, **healthy) == 1
    # an endpoint announcing shutdown right after every connect is backed off like a drop
    assert failures_after_end(3, shutdown_announced=True, **short) == 4
    assert failures_after_end(3, shutdown_announced=False, **short) == 4


def test_reconnect_reasons() -> None:
    assert reconnect_reason("drop") == "drop"
    assert reconnect_reason("stale") == "stale"
    assert reconnect_reason("error") == "error"
    assert reconnect_reason(None) == "rotation"  # replaced while open: planned
    # announced, whether Binance closed before we rotated or not
    assert reconnect_reason("drop", shutdown_announced=True) == "server_shutdown"
    assert reconnect_reason(None, shutdown_announced=True) == "server_shutdown"
    # the metric is created with every reason at 0
    assert metrics.RECONNECT_REASONS == RECONNECT_REASONS


@pytest.mark.parametrize("as_bytes", [False, True])
def test_server_shutdown_is_recognised_only_as_the_event(as_bytes: bool) -> None:
    def raw(doc: object) -> str | bytes:
        encoded = orjson.dumps(doc)
        return encoded if as_bytes else encoded.decode()

    assert announces_server_shutdown(raw({"e": "serverShutdown", "E": 1}))
    combined = {"stream": "btcusdt@kline_1m", "data": {"e": "serverShutdown", "E": 1}}
    assert announces_server_shutdown(raw(combined))
    # a mention elsewhere, a malformed frame, or an ordinary one is not
    assert not announces_server_shutdown(raw({"e": "aggTrade", "note": "serverShutdown"}))
    assert not announces_server_shutdown(b"serverShutdown" if as_bytes else "serverShutdown")
    assert not announces_server_shutdown(raw({"result": None, "id": 1}))
