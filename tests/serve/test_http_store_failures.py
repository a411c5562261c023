"""What the HTTP API tells a client of a store failure (nothing of its internals: a PostgreSQL
store whose tables were gone answered ``UndefinedTable: relation "candles" does not exist``
to anyone), what it logs of it (the detail, at ERROR, once a minute at most), and the
``X-Content-Type-Options: nosniff`` of its JSON answers."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Any, NoReturn

import httpx
import psycopg
import pytest
import trio

from tests.serve.test_http_api import AUTH, CANDLES, INGEST, TOKEN, RecordingTarget, running_api
from tests.serve.test_http_validation import BTC, ETH, body_for
from tests.store_pg.conftest import pg_url as pg_url  # a fresh PostgreSQL database
from tradecanvas.errors import StoreError, StoreUnreachable
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestPipeline
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.serve.http_api import (
    INGEST_FAILED_MESSAGE,
    STORE_FAILED_MESSAGE,
    build_http_app,
)
from tradecanvas.serve.http_server import serve_http
from tradecanvas.store.open import open_store
from tradecanvas.store.pg_pool import translated

INTERNALS = 'candle store read failed: UndefinedTable: relation "candles" does not exist'
STORE_FAILED = {"error": "store_failed", "message": STORE_FAILED_MESSAGE}


async def _fail(*args: Any, **kwargs: Any) -> NoReturn:
    raise StoreError(INTERNALS)


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "tradecanvas.serve.http_api" and r.levelno == logging.ERROR
    ]


async def test_a_failed_read_says_nothing_of_the_store_and_is_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_api(tmp_path) as api:
        for method in ("window", "heads", "events_after", "events_pruned_upto"):
            monkeypatch.setattr(api.store, method, _fail)
        with caplog.at_level(logging.ERROR, logger="tradecanvas.serve.http_api"):
            answers = [
                await api.client.get(CANDLES, params={"series_id": BTC}),
                await api.client.get("/api/market/series"),
                await api.client.get("/api/market/events", params={"after": 0}),
                await api.client.get(CANDLES, params={"series_id": ETH}),
            ]
            for r in answers:
                assert (r.status_code, r.json()) == (500, STORE_FAILED)
                assert "UndefinedTable" not in r.text
            # the detail is in the log: the first failure's, at once; the others within the
            # minute are counted in the next line
            assert _errors(caplog) == [
                f"GET candles {BTC}: {INTERNALS} (1 failed store read(s) since the last such line)"
            ]
            # the writer (authenticated) is told no more, and each refused write is logged
            await api.store.aclose()
            r = await api.client.post(INGEST, json=body_for(), headers=AUTH)
            assert (r.status_code, r.json()) == (
                500,
                {"error": "ingest_failed", "message": INGEST_FAILED_MESSAGE},
            )
            assert len(_errors(caplog)) == 2 and "HTTP ingest of" in _errors(caplog)[1]


async def test_a_postgresql_store_whose_tables_are_gone(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The review's case, on a real PostgreSQL."""
    flags = build_runtime_flags(
        {"TRADE_CANVAS_SERIES": BTC, "TRADE_CANVAS_INGEST_TOKEN": TOKEN}
    ).flags
    store = await open_store(pg_url)
    pipeline = IngestPipeline(
        store, RecordingTarget(), flags.derived_timeframes, flags.derivation_fingerprint()
    )
    app = build_http_app(
        store=store, pipeline=pipeline, flags=flags, metrics=Metrics(), readiness=dict
    )
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute("DROP TABLE candles CASCADE")
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(partial(serve_http, app, host="127.0.0.1", port=0))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                with caplog.at_level(logging.ERROR, logger="tradecanvas.serve.http_api"):
                    r = await client.get(CANDLES, params={"series_id": BTC})
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()
    assert (r.status_code, r.json()) == (500, STORE_FAILED)
    assert r.headers["x-content-type-options"] == "nosniff"
    assert len(_errors(caplog)) == 1 and 'relation "candles" does not exist' in _errors(caplog)[0]


async def test_every_json_answer_says_nosniff_and_the_page_keeps_its_headers(
    tmp_path: Path,
) -> None:
    async with running_api(tmp_path) as api:
        get = api.client.get
        answers = [
            await get(CANDLES, params={"series_id": BTC}),  # 200
            await get(CANDLES, params={"series_id": BTC, "limit": "0"}),  # 422
            await get(CANDLES, params={"series_id": "binance:spot:XRP/USDT:1m"}),  # 404
            await get("/nope"),  # 404 not_found
            await api.client.put("/healthz"),  # 405
            await api.client.post(INGEST, json=body_for()),  # 401
            await get("/api/market/series", headers={"accept-encoding": "gzip"}),
            await get("/healthz"),
            await get("/readyz"),
            await get("/metrics"),
        ]
        for r in answers:
            assert r.headers.get_list("x-content-type-options") == ["nosniff"], r.url
        assert [r.status_code for r in answers] == [
            200,
            422,
            404,
            404,
            405,
            401,
            200,
            200,
            200,
            200,
        ]
        page = await get("/")
        assert page.headers.get_list("x-content-type-options") == ["nosniff"]
        assert page.headers["content-security-policy"].startswith("default-src 'none';")


async def test_a_read_during_a_store_outage_is_a_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL restarting: the store's own lines report the outage (an ERROR only if it
    lasts), so a read it failed is a WARNING, not one more ERROR per minute."""
    lost = "candle store read failed: PoolTimeout: couldn't get a connection after 2.00 sec"

    async def unreachable(*args: Any, **kwargs: Any) -> NoReturn:
        raise StoreUnreachable(lost)

    async with running_api(tmp_path) as api:
        monkeypatch.setattr(api.store, "window", unreachable)
        with caplog.at_level(logging.WARNING, logger="tradecanvas.serve.http_api"):
            r = await api.client.get(CANDLES, params={"series_id": BTC})
    assert (r.status_code, r.json()) == (500, STORE_FAILED)
    said = [(x.levelno, x.getMessage()) for x in caplog.records if x.name.endswith("http_api")]
    assert said == [
        (
            logging.WARNING,
            f"GET candles {BTC}: {lost} (1 failed store read(s) since the last such line)",
        )
    ]


def test_a_lost_connection_is_unreachable_and_a_broken_statement_is_not() -> None:
    lost = pytest.raises(StoreUnreachable, match="candle store read failed: OperationalError")
    with lost, translated("read"):
        raise psycopg.OperationalError("server closed the connection unexpectedly")
    with pytest.raises(StoreError) as broken, translated("read"):
        raise psycopg.errors.UndefinedTable('relation "candles" does not exist')
    assert type(broken.value) is StoreError
