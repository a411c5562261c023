"""The connection plan (pure): stream URLs, connection groups, reconnect naming, backoff
and pacing, and the futures route check."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tradecanvas.errors import FlagError
from tradecanvas.model import SeriesId
from tradecanvas.ops import metrics
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.upstream.plan import (
    RECONNECT_REASONS,
    SILENT_WARN_AFTER,
    SILENT_WARN_EVERY,
    ConnectPacer,
    announces_server_shutdown,
    build_combined_stream_url,
    connection_groups,
    failures_after_end,
    futures_ws_route_warning,
    lacks_futures_route,
    reconnect_reason,
    silent_slot_warning,
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
    def step(lived_s: float, *, announced: bool, still_open: bool = False) -> int:
        return failures_after_end(
            3,
            lived_s=lived_s,
            healthy_after_s=60.0,
            shutdown_announced=announced,
            still_open=still_open,
        )

    # serverShutdown after a healthy hour: reconnect at once
    assert step(3600.0, announced=True) == 0
    assert step(3600.0, announced=False) == 1
    # an endpoint announcing shutdown right after every connect is backed off like a drop
    assert step(0.5, announced=True) == 4
    assert step(0.5, announced=False) == 4
    # rotated while still open (serverShutdown, or the 24 h cut): at once only when healthy
    assert step(3600.0, announced=True, still_open=True) == 0
    assert step(3600.0, announced=False, still_open=True) == 0
    assert step(0.5, announced=True, still_open=True) == 4


@given(
    failures=st.integers(0, 1000),
    lived_s=st.floats(0.0, 1e6),
    healthy_after_s=st.floats(0.0, 1e4),
    shutdown_announced=st.booleans(),
    still_open=st.booleans(),
)
def test_only_a_healthy_connection_restarts_the_backoff(
    failures: int,
    lived_s: float,
    healthy_after_s: float,
    shutdown_announced: bool,
    still_open: bool,
) -> None:
    """Whatever ended it — announced, rotated while open, dropped — a connection that did
    not live ``healthy_after_s`` backs off one step further; a healthy one restarts the
    backoff, at once when its end was announced or planned."""
    step = failures_after_end(
        failures,
        lived_s=lived_s,
        healthy_after_s=healthy_after_s,
        shutdown_announced=shutdown_announced,
        still_open=still_open,
    )
    if lived_s < healthy_after_s:
        assert step == failures + 1
    else:
        assert step == (0 if shutdown_announced or still_open else 1)


@given(
    asked=st.lists(st.floats(0.0, 1000.0), min_size=1, max_size=50),
    interval_s=st.one_of(st.just(0.0), st.floats(1e-3, 10.0)),
)
def test_connect_turns_are_an_interval_apart_and_no_later_than_needed(
    asked: list[float], interval_s: float
) -> None:
    """However many slots ask, and when: every turn is at or after its request, at least
    the interval after the turn before it, and exactly the later of the two."""
    pacer = ConnectPacer()
    turns: list[float] = []
    for now in sorted(asked):  # the callers' clock only moves forward
        turn = pacer.reserve(now, interval_s)
        assert turn >= now
        if turns:
            assert turn - turns[-1] >= interval_s - 1e-9  # float rounding of the sum
            assert turn == max(now, turns[-1] + interval_s)
        else:
            assert turn == now
        turns.append(turn)


def test_the_futures_route_is_a_path_segment() -> None:
    assert not lacks_futures_route("wss://fstream.binance.com/market")
    assert not lacks_futures_route("wss://fstream.binance.com/market/stream?streams=a@kline_1m")
    assert not lacks_futures_route("ws://proxy:81/binance/market")
    assert lacks_futures_route("wss://fstream.binance.com")
    assert lacks_futures_route("wss://fstream.binance.com/stream?streams=market@kline_1m")
    assert lacks_futures_route("ws://127.0.0.1:9443/marketplace")


@pytest.mark.parametrize(
    ("url", "role", "series", "expected"),
    [
        ("wss://fstream.binance.com/market", "all", "binance:futures:BTC/USDT:1m", None),
        ("ws://127.0.0.1:9443", "all", "binance:futures:BTC/USDT:1m", "warning"),
        ("ws://127.0.0.1:9443", "ingest", "binance:futures:BTC/USDT:1m", "warning"),
        ("ws://127.0.0.1:9443", "edge", "binance:futures:BTC/USDT:1m", None),
        ("ws://127.0.0.1:9443", "all", "binance:spot:BTC/USDT:1m", None),
        ("wss://fstream.binance.com", "all", "binance:futures:BTC/USDT:1m", "refused"),
        ("wss://fstream.binance.com/ws", "edge", "binance:spot:BTC/USDT:1m", "refused"),
        ("https://FSTREAM.Binance.com/", "all", "binance:futures:BTC/USDT:1m", "refused"),
    ],
)
def test_a_futures_url_without_the_market_route(
    url: str, role: str, series: str, expected: str | None
) -> None:
    """Refused on Binance's own host (it would never send a kline); a warning elsewhere
    (a stand-in may serve another path), when this process connects to futures."""
    environ = {
        "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": url,
        "TRADE_CANVAS_ROLE": role,
        "TRADE_CANVAS_SERIES": series,
    }
    if role != "all":
        environ["TRADE_CANVAS_REDIS_URL"] = "redis://127.0.0.1:6379/0"
    flags = build_runtime_flags(environ).flags
    if expected == "refused":
        with pytest.raises(FlagError, match="lacks the /market route") as refused:
            futures_ws_route_warning(flags)
        assert refused.value.variable == "TRADE_CANVAS_BINANCE_FUTURES_WS_URL"
        assert "allowed: wss://fstream.binance.com/market" in str(refused.value)
        return
    warning = futures_ws_route_warning(flags)
    if expected is None:
        assert warning is None
    else:
        assert warning is not None and "no /market route" in warning and url in warning


@given(stale_ends=st.integers(1, 500))
def test_a_silent_slot_is_reported_after_three_stale_ends_then_now_and_then(
    stale_ends: int,
) -> None:
    unrouted = silent_slot_warning("ws://127.0.0.1:9/stream?streams=a@kline_1m", stale_ends)
    due = (
        stale_ends >= SILENT_WARN_AFTER
        and (stale_ends - SILENT_WARN_AFTER) % SILENT_WARN_EVERY == 0
    )
    assert (unrouted is not None) == due
    if unrouted is not None:
        assert f"({stale_ends} connections went stale)" in unrouted
        assert "/market route" in unrouted and "if this is a USDⓈ-M futures URL" in unrouted


def test_the_silent_slot_warning_names_the_route_only_where_it_may_be_the_cause() -> None:
    n = SILENT_WARN_AFTER
    binance = silent_slot_warning("wss://fstream.binance.com/stream?streams=a@kline_1m", n)
    assert binance is not None and "the USDⓈ-M futures URL lacks the /market route" in binance
    routed = silent_slot_warning("wss://fstream.binance.com/market/stream?streams=a", n)
    spot = silent_slot_warning("wss://stream.binance.com:9443/stream?streams=a", n)
    for other in (routed, spot):
        assert other is not None and "/market" not in other


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
