"""``GET /healthz`` says what the node knows of Binance (``upstream``), for the chart page,
which polls it to know within seconds that the source is gone (docs/chart.md): /readyz would
say so too, but it names the lease holder and is kept off a public proxy (docs/operations.md).
The answer stays 200 whatever it says: it is a liveness probe."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve.test_http_api import RecordingTarget
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.serve.http_api import build_http_app
from tradecanvas.store.sqlite import CandleStore


async def _healthz(
    tmp_path: Path,
    readiness: Callable[[], Mapping[str, bool]],
    about: Callable[[], Mapping[str, Any]] = dict,
) -> tuple[int, Any]:
    flags = build_runtime_flags(
        {
            "TRADE_CANVAS_SERIES": "binance:futures:BTC/USDT:1m",
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
        )
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            answer = await client.get("/healthz")
            return answer.status_code, answer.json()
    finally:
        await store.aclose()


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
    assert (status, body) == (200, {"status": "ok", "upstream": upstream})


async def test_healthz_is_200_with_upstream_unknown_when_the_readiness_check_raises(
    tmp_path: Path,
) -> None:
    assert await _healthz(tmp_path, _raises) == (200, {"status": "ok", "upstream": None})
