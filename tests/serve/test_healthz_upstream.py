"""``GET /healthz`` says what the node knows of Binance (``upstream``), for the chart page,
which polls it to know within seconds that the source is gone (docs/chart.md): /readyz would
say so too, but it names the lease holder and is kept off a public proxy (docs/operations.md).
The answer stays 200 whatever it says: it is a liveness probe.

With ``?series_id=`` it answers for the connection that carries that series (its base
series'), so a spot chart is not told "Binance unreachable" while only the futures
connection is down (docs/api.md)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import httpx
import pytest

from tests.browser.rig import WAIT_S, Market, free_port, market
from tests.conftest import binance_data_dir
from tests.serve.test_http_api import RecordingTarget
from tradecanvas.ingest.supervisor import ConnectionState
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.serve.http_api import build_http_app
from tradecanvas.store.sqlite import CandleStore


async def _healthz(
    tmp_path: Path,
    readiness: Callable[[], Mapping[str, bool]],
    about: Callable[[], Mapping[str, Any]] = dict,
    connections: Callable[[], Sequence[ConnectionState] | None] = lambda: None,
    query: str = "",
) -> tuple[int, Any]:
    flags = build_runtime_flags(
        {
            "TRADE_CANVAS_SERIES": f"{FUTURES},{SPOT},{SPOT_ETH}",
            "TRADE_CANVAS_DB_PATH": str(tmp_path / "market.sqlite3"),
        }
    ).flags
    store = await CandleStore.open(flags.db_path)
    try:
        pipeline = IngestPipeline(
            store, RecordingTarget(), flags.derived_timeframes, flags.derivation_fingerprint()
        )
        app = build_http_app(
            store=store,
            pipeline=pipeline,
            flags=flags,
            metrics=Metrics(),
            readiness=readiness,
            about=about,
            connections=connections,
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answer = await client.get(f"/healthz{query}")
            return answer.status_code, answer.json()
    finally:
        await store.aclose()


FUTURES = "binance:futures:BTC/USDT:1m"
SPOT = "binance:spot:BTC/USDT:1m"
SPOT_ETH = "binance:spot:ETH/USDT:1m"


def _raises() -> Mapping[str, bool]:
    raise RuntimeError("boom")


@pytest.mark.parametrize(
    ("checks", "about", "upstream"),
    [
        # a node with its own Binance connections (serve, or the ingest holding the lease)
        ({"store_open": True, "upstream_connected": True}, {}, "connected"),
        ({"store_open": True, "upstream_connected": False}, {}, "disconnected"),
        # an edge: what the ingest node holding the lease reports
        (
            {"store_open": True},
            {"ingest": {"node": "a:1", "upstream_connected": True}},
            "connected",
        ),
        (
            {"store_open": True},
            {"ingest": {"node": "a:1", "upstream_connected": False}},
            "disconnected",
        ),
        ({"store_open": True}, {"ingest": None}, "no_ingest"),
        # a standby ingest node, an edge before its first read of the report: not known
        ({"store_open": True}, {}, None),
    ],
)
async def test_healthz_says_what_the_node_knows_of_binance_and_stays_200(
    tmp_path: Path, checks: dict[str, bool], about: dict[str, Any], upstream: str | None
) -> None:
    status, body = await _healthz(tmp_path, lambda: checks, lambda: about)
    assert (status, body) == (200, {"status": "ok", "upstream": upstream, "connections": None})


async def test_healthz_is_200_with_upstream_unknown_when_the_readiness_check_raises(
    tmp_path: Path,
) -> None:
    assert await _healthz(tmp_path, _raises) == (
        200,
        {"status": "ok", "upstream": None, "connections": None},
    )


# futures down; spot up on one connection (BTC) and down on another (ETH)
CONNECTIONS = (
    ConnectionState("futures", (FUTURES,), False),
    ConnectionState("spot", (SPOT,), True),
    ConnectionState("spot", (SPOT_ETH,), False),
)
OWN = {"store_open": True, "upstream_connected": False}
EDGE_ABOUT = {"ingest": {"node": "a:1", "upstream_connected": False}}


@pytest.mark.parametrize(
    ("series_id", "upstream"),
    [
        (SPOT, "connected"),
        ("binance:spot:BTC/USDT:5m", "connected"),  # a derived series: its base's connection
        (FUTURES, "disconnected"),
        ("binance:futures:BTC/USDT:5m", "disconnected"),
        (SPOT_ETH, "disconnected"),  # the same market, another connection
    ],
)
@pytest.mark.parametrize("edge", [False, True])
async def test_healthz_answers_for_the_connection_that_carries_the_series(
    tmp_path: Path, series_id: str, upstream: str, edge: bool
) -> None:
    checks, about = ({"store_open": True}, EDGE_ABOUT) if edge else (OWN, {})
    status, body = await _healthz(
        tmp_path,
        lambda: checks,
        lambda: about,
        lambda: CONNECTIONS,
        query=f"?series_id={series_id}",
    )
    counts = {"futures": {"open": 0, "total": 1}, "spot": {"open": 1, "total": 2}}
    assert (status, body) == (
        200,
        {"status": "ok", "series_id": series_id, "upstream": upstream, "connections": counts},
    )


async def test_plain_healthz_keeps_the_whole_node_meaning_and_counts_the_connections(
    tmp_path: Path,
) -> None:
    """Without a series: ``connected`` only while every connection is open; the counts say
    how many of each market are."""
    status, body = await _healthz(tmp_path, lambda: OWN, connections=lambda: CONNECTIONS)
    assert (status, body["upstream"]) == (200, "disconnected")
    assert body["connections"] == {
        "futures": {"open": 0, "total": 1},
        "spot": {"open": 1, "total": 2},
    }


@pytest.mark.parametrize(
    "query",
    [
        "?series_id=binance:spot:DOGE/USDT:1m",  # well-formed, not served
        "?series_id=nonsense",
        "?series_id=binance:mars:BTC/USDT:1m",
        "?series_id=%00%ff",
    ],
)
async def test_a_series_id_that_is_not_served_is_answered_null_not_refused(
    tmp_path: Path, query: str
) -> None:
    status, body = await _healthz(
        tmp_path, lambda: OWN, connections=lambda: CONNECTIONS, query=query
    )
    assert (status, body["series_id"], body["upstream"]) == (200, None, None)


@pytest.mark.parametrize(
    ("checks", "about", "connections", "upstream"),
    [
        # an older ingest's report (no connections): the whole node's answer, as before
        ({"store_open": True}, EDGE_ABOUT, None, "disconnected"),
        # no ingest node, a standby: what is known of the node, whatever the connections
        ({"store_open": True}, {"ingest": None}, None, "no_ingest"),
        ({"store_open": True}, {}, CONNECTIONS, None),
        # the ingest carries another set of series (a configuration being rolled out)
        (OWN, {}, (ConnectionState("futures", (FUTURES,), False),), None),
    ],
)
async def test_a_series_answer_falls_back_to_what_is_known(
    tmp_path: Path,
    checks: dict[str, bool],
    about: dict[str, Any],
    connections: tuple[ConnectionState, ...] | None,
    upstream: str | None,
) -> None:
    status, body = await _healthz(
        tmp_path, lambda: checks, lambda: about, lambda: connections, query=f"?series_id={SPOT}"
    )
    assert (status, body["series_id"], body["upstream"]) == (200, SPOT, upstream)


# --- a real daemon: spot replayed, futures pointed at a port nobody listens on --------------

ADA: Final = "binance:spot:ADA/BTC:1m"
ADA_5M: Final = "binance:spot:ADA/BTC:5m"
ADA_CSV: Final = "klines_1m_5m/spot_octobot/ADABTC-1m-2020-04-28_octobot.csv"
ADA_HISTORY: Final = 300  # REST history; the rest is streamed once the replay is resumed
ETH: Final = "binance:futures:ETH/USDT:1m"  # its connection never opens


@contextmanager
def spot_up_futures_down(tmp_path: Path, **serve_env: str) -> Iterator[Market]:
    """``tradecanvas replay`` of real spot minutes (paused: the connection is open, the
    series quiet) and ``tradecanvas serve`` of ADA/BTC spot and ETH/USDT futures, whose
    Binance URLs name a loopback port nobody listens on."""
    closed = free_port()
    with market(
        tmp_path,
        f"{ADA}={binance_data_dir() / ADA_CSV}",
        "--market",
        "spot",
        "--start-at",
        str(ADA_HISTORY),
        TRADE_CANVAS_SERIES=f"{ADA},{ETH}",
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL=f"ws://127.0.0.1:{closed}/market",
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL=f"http://127.0.0.1:{closed}",
        TRADE_CANVAS_INITIAL_BACKFILL_CANDLES=str(ADA_HISTORY),
        TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
        **serve_env,
    ) as m:
        yield m


def wait_healthz(m: Market, shown: Callable[[dict[str, Any]], bool], **params: str) -> Any:
    """Poll ``/healthz`` (with ``params``) until ``shown`` holds of its body, within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not shown(body := m.get("/healthz", **params)):
        assert time.monotonic() < deadline, f"/healthz {params}: {body}"
        time.sleep(0.05)  # polling the daemon's answer, not waiting out a race
    return body


@pytest.mark.e2e
def test_a_daemon_with_one_market_down_answers_each_series_for_its_own_connection(
    tmp_path: Path,
) -> None:
    """The review's case: futures unreachable, spot connected. Spot (and what is derived from
    it) is ``connected``; futures ``disconnected``; plain /healthz says not every connection
    is open, and how many of each market are."""
    with spot_up_futures_down(tmp_path) as m:
        body = wait_healthz(m, lambda b: b["upstream"] == "connected", series_id=ADA)
        assert body == {
            "status": "ok",
            "series_id": ADA,
            "upstream": "connected",
            "connections": {"futures": {"open": 0, "total": 1}, "spot": {"open": 1, "total": 1}},
        }
        assert m.get("/healthz", series_id=ADA_5M)["upstream"] == "connected"
        assert m.get("/healthz", series_id=ETH)["upstream"] == "disconnected"
        whole = m.get("/healthz")
        assert (whole["upstream"], "series_id" in whole) == ("disconnected", False)
        # not served, not a series: answered, not refused
        for bad in ("binance:spot:DOGE/USDT:1m", "nonsense"):
            answer = httpx.get(f"{m.http_url}/healthz", params={"series_id": bad})
            assert answer.status_code == 200, answer.text
            assert answer.json()["upstream"] is None
