"""``describe_served``: what an ``unknown_series`` refusal says is served."""

from __future__ import annotations

from tradecanvas.serve.served import MAX_LISTED, describe_served

TIMEFRAMES = ("1m", "3m", "5m", "15m", "30m", "1h", "2h", "4h", "6h", "8h", "12h", "1d", "3d",
              "1w", "1M")  # fmt: skip


def served(*symbols: str) -> list[str]:
    return [f"binance:futures:{s}:{tf}" for s in symbols for tf in TIMEFRAMES]


def test_a_served_symbol_lists_all_its_timeframes_shortest_first() -> None:
    """15 timeframes of one symbol (the list cut at 10 hid 3m, 4h, 5m, 6h and 8h)."""
    text = describe_served("binance:futures:BTC/USDT:7m", served("BTC/USDT", "ETH/USDT"))
    assert text == "binance:futures:BTC/USDT is served in " + ", ".join(TIMEFRAMES)


def test_an_unserved_symbol_lists_the_symbols_and_counts_the_rest() -> None:
    symbols = [f"A{i:02d}/USDT" for i in range(MAX_LISTED + 3)]
    text = describe_served("binance:spot:BTC/USDT:1m", served(*symbols))
    listed = ", ".join(f"binance:futures:{s}" for s in symbols[:MAX_LISTED])
    assert text.startswith(f"served: {listed} and 3 more, each in its timeframes")
    assert "GET /api/market/series" in text
    few = describe_served("binance:spot:BTC/USDT:1m", served("ETH/USDT"))
    assert few.startswith("served: binance:futures:ETH/USDT, each") and "more" not in few


def test_nothing_served() -> None:
    assert describe_served("binance:spot:BTC/USDT:1m", []) == "this daemon serves no series"
