"""The HTTP API through a real Hypercorn (trio worker) on 127.0.0.1 port 0, a real SQLite
CandleStore in tmp_path and a real IngestPipeline; requests through httpx.AsyncClient."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Final

import attrs
import httpx
import orjson
import pytest
import trio
import trio.testing
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Receive, Scope, Send

from tests.conftest import candle, flat_minutes
from tests.serve.http_rig import StoppableServer
from tests.serve.test_http_validation import BAD_BODIES, BTC, BTC5, ETH, T0, body_for
from tradecanvas.model import Candle, SeriesId
from tradecanvas.ops.metrics import Metrics
from tradecanvas.pipeline.commit import IngestBatch, IngestPipeline
from tradecanvas.pipeline.events import SystemEvent
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.serve.http_api import MAX_BODY_BYTES, build_http_app
from tradecanvas.serve.http_server import serve_http
from tradecanvas.serve.http_validation import DEFAULT_LIMIT, MAX_LIMIT
from tradecanvas.store.sqlite import CandleStore

TOKEN = "test-ingest-token-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INGEST = "/api/market/ingest/candle_closed"
CANDLES = "/api/market/candles"


class RecordingTarget:
    """A PublishTarget that records what is queued; with ``fail`` every delivery fails."""

    def __init__(self, *, fail: bool = False) -> None:
        self.fail = fail
        self.closed: list[tuple[str, list[int]]] = []
        self.system: list[tuple[str, str]] = []

    def publish_closed(self, series_id: str, candles: Sequence[Candle]) -> Sequence[str]:
        self.closed.append((series_id, [c.candle_time for c in candles]))
        return [f"subscriber 7 of {series_id} is gone"] if self.fail else []

    def publish_system(self, event: SystemEvent) -> Sequence[str]:
        self.system.append((event.series_id, event.reason))
        return []


@attrs.define
class Api:
    client: httpx.AsyncClient
    store: CandleStore
    pipeline: IngestPipeline
    target: RecordingTarget
    metrics: Metrics
    ready: dict[str, bool]
    port: int


@asynccontextmanager
async def running_api(
    tmp_path: Path,
    *,
    token: str | None = TOKEN,
    fail_publish: bool = False,
    clock: Callable[[], float] | None = None,
    readiness: Callable[[], dict[str, bool]] | None = None,
    more_env: dict[str, str] | None = None,
) -> AsyncIterator[Api]:
    env = {
        "TRADE_CANVAS_SERIES": f"{BTC},{ETH}",
        "TRADE_CANVAS_DERIVED_TIMEFRAMES": "5m",
        "TRADE_CANVAS_DB_PATH": str(tmp_path / "market.sqlite3"),
        **(more_env or {}),
    }
    if token is not None:
        env["TRADE_CANVAS_INGEST_TOKEN"] = token
    flags = build_runtime_flags(env).flags
    store = await CandleStore.open(flags.db_path)
    target = RecordingTarget(fail=fail_publish)
    pipeline = IngestPipeline(
        store, target, flags.derived_timeframes, flags.derivation_fingerprint()
    )
    metrics = Metrics()
    ready = {"listeners_bound": True, "upstream_connected": True}
    extra: dict[str, Any] = {} if clock is None else {"clock": clock}
    app = build_http_app(
        store=store,
        pipeline=pipeline,
        flags=flags,
        metrics=metrics,
        readiness=readiness or (lambda: ready),
        **extra,
    )
    try:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(partial(serve_http, app, host="127.0.0.1", port=0))
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
                yield Api(client, store, pipeline, target, metrics, ready, port)
            nursery.cancel_scope.cancel()
    finally:
        await store.aclose()


async def stored_times(store: CandleStore, series_id: str = BTC) -> list[int]:
    return [s.candle.candle_time for s in await store.range(series_id, 0, 2**40)]


def metric_value(text: str, family: str, **labels: str) -> float:
    for fam in text_string_to_metric_families(text):
        if fam.name != family:
            continue
        for sample in fam.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in labels.items()
            ):
                return float(sample.value)
    raise AssertionError(f"no sample of {family} with {labels}")


# --- the auth matrix ---------------------------------------------------------------------


async def test_write_endpoint_refused_with_403_when_no_token_is_configured(
    tmp_path: Path,
) -> None:
    async with running_api(tmp_path, token=None) as api:
        for headers in ({}, AUTH):
            r = await api.client.post(INGEST, json=body_for(), headers=headers)
            assert r.status_code == 403
            assert r.json()["error"] == "ingest_disabled"
            assert "TRADE_CANVAS_INGEST_TOKEN" in r.json()["message"]
            assert "ingest-token" in r.json()["message"]
        assert await stored_times(api.store) == []
        assert api.target.closed == []


@pytest.mark.parametrize(
    ("authorization", "error_hint"),
    [
        (None, None),
        (b"", None),
        (b"Bearer", "invalid_token"),
        (b"Bearer wrong-token-0123456789abcdef", "invalid_token"),
        (f"Bearer {TOKEN}x".encode(), "invalid_token"),
        (f"Bearer {TOKEN[:-1]}".encode(), "invalid_token"),
        (f"Basic {TOKEN}".encode(), "invalid_token"),
        (TOKEN.encode(), "invalid_token"),
        ("Bearer tökén".encode(), "invalid_token"),
    ],
)
async def test_missing_or_bad_token_is_401_with_a_bearer_challenge(
    tmp_path: Path, authorization: bytes | None, error_hint: str | None
) -> None:
    headers = {} if authorization is None else {b"Authorization": authorization}
    async with running_api(tmp_path) as api:
        r = await api.client.post(INGEST, json=body_for(), headers=headers)
        assert r.status_code == 401, r.text
        assert r.json()["error"] == "unauthorized"
        challenge = r.headers["www-authenticate"]
        assert challenge.startswith("Bearer ")
        if error_hint:
            assert error_hint in challenge
        assert TOKEN not in r.text
        assert await stored_times(api.store) == []
        assert api.target.closed == []


async def test_refused_writes_are_logged_once_a_minute_with_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tradecanvas.serve.http_api")
    async with running_api(tmp_path) as api:
        bad = {"Authorization": "Bearer wrong-token"}
        for _ in range(3):
            r = await api.client.post(INGEST, json=body_for(), headers=bad)
            assert r.status_code == 401, r.text
    lines = [r.getMessage() for r in caplog.records if r.name == "tradecanvas.serve.http_api"]
    # the first is logged at once; the next two fall in the same minute
    assert lines == [
        "HTTP write refused from 127.0.0.1: invalid bearer token"
        " (1 refused since the last such line)"
    ]
    assert "wrong-token" not in caplog.text


async def test_good_token_commits_derives_and_publishes(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tradecanvas.serve.http_api")
    async with running_api(tmp_path) as api:
        for i in range(5):
            # the scheme is case-insensitive
            auth = {"Authorization": f"bearer {TOKEN}"} if i == 1 else AUTH
            r = await api.client.post(INGEST, json=body_for(T0 + 60 * i), headers=auth)
            assert r.status_code == 200, r.text
            assert r.json() == {
                "ok": True,
                "series_id": BTC,
                "candle_time": T0 + 60 * i,
                "committed": 2 if i == 4 else 1,  # the 5th minute closes the 5m bar
            }
        assert await stored_times(api.store) == [T0 + 60 * i for i in range(5)]
        stored = (await api.store.range(BTC, T0, T0 + 1))[0]
        assert stored.source == "http"
        assert await stored_times(api.store, BTC5) == [T0]
        assert api.target.closed[-2:] == [(BTC, [T0 + 240]), (BTC5, [T0])]
        assert (BTC, "new_series") in api.target.system
        # the same candle again is accepted and changes nothing
        r = await api.client.post(INGEST, json=body_for(T0), headers=AUTH)
        assert r.status_code == 200
        assert r.json()["committed"] == 0
    # every accepted write is on the record: who, which series and minute, what it changed
    writes = [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP write")]
    assert len(writes) == 6
    assert writes[-1] == f"HTTP write from 127.0.0.1: {BTC} at {T0} (0 row(s) committed)"


async def test_values_are_kept_exactly_numbers_strings_and_float_reprs(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        raw = (
            b'{"series_id": "binance:futures:BTC/USDT:1m", "candle": {"candle_time": '
            + str(T0).encode()
            + b', "open": 0.1, "high": "65000.10", "low": 0.007, "close": 1e-2,'
            b' "volume": 3}}'
        )
        r = await api.client.post(
            INGEST, content=raw, headers={**AUTH, "Content-Type": "application/json"}
        )
        assert r.status_code == 200, r.text
        c = (await api.store.range(BTC, T0, T0 + 1))[0].candle
        assert (str(c.open), str(c.high), str(c.low), str(c.close), str(c.volume)) == (
            "0.1",  # the float's repr, not 0.1000000000000000055511151231257827…
            "65000.10",  # decimal strings exactly as sent
            "0.007",
            "0.01",
            "3",
        )


# --- the validation matrix ----------------------------------------------------------------


# every bad body's refusal is tests/serve/test_http_validation.py's; a sample of kinds here
BAD_ON_THE_WIRE: Final = [
    pytest.param(raw, field, fragment, id=name)
    for name, raw, field, fragment in BAD_BODIES
    if name in ("not json", "derived series", "misaligned time", "bool price")
]


@pytest.mark.parametrize(("raw", "field", "fragment"), BAD_ON_THE_WIRE)
async def test_bad_bodies_are_422_naming_the_field_and_change_nothing(
    tmp_path: Path, raw: bytes, field: str, fragment: str
) -> None:
    async with running_api(tmp_path) as api:
        r = await api.client.post(INGEST, content=raw, headers=AUTH)
        assert r.status_code == 422, r.text
        doc = r.json()
        assert doc["error"] == "bad_request"
        assert any(e["field"] == field and fragment in e["message"] for e in doc["errors"]), doc
        assert fragment in doc["message"]
        assert await stored_times(api.store) == []
        assert api.target.closed == []
        assert (
            metric_value(
                (await api.client.get("/metrics")).text, "tradecanvas_publish", path="http"
            )
            == 0
        )


async def test_every_bad_candle_field_is_reported_at_once(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        r = await api.client.post(INGEST, json=body_for(1.5, open="x", volume=None), headers=AUTH)
        assert r.status_code == 422
        fields = [e["field"] for e in r.json()["errors"]]
        assert fields == ["candle.candle_time", "candle.open", "candle.volume"]


async def test_unserved_base_series_write_is_422_unknown_series(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        sol = "binance:futures:SOL/USDT:1m"
        r = await api.client.post(INGEST, json=body_for(series_id=sol), headers=AUTH)
        assert r.status_code == 422
        assert r.json()["error"] == "unknown_series"
        assert await stored_times(api.store, sol) == []


async def raw_exchange(port: int, head: bytes, body_parts: Sequence[bytes]) -> tuple[int, bytes]:
    """Send one request over a plain TCP stream and read the answer: (status, body).

    httpx would do, except that it abandons its body iterator when the server answers
    before the body is sent, and filterwarnings=error turns that into a failure.
    """
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    with trio.fail_after(10):  # a server that waits for more body fails the test, not hangs it
        async with stream:
            await stream.send_all(head)
            for part in body_parts:
                await stream.send_all(part)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                assert chunk, f"connection closed after {data!r}"
                data += chunk
            header_block, _, body = data.partition(b"\r\n\r\n")
            lines = header_block.split(b"\r\n")
            status = int(lines[0].split()[1])
            length = next(
                int(v)
                for k, _, v in (h.partition(b":") for h in lines[1:])
                if k.lower() == b"content-length"
            )
            while len(body) < length:
                chunk = await stream.receive_some()
                assert chunk
                body += chunk
    return status, body


def post_head(headers: str) -> bytes:
    return (
        f"POST {INGEST} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\n{headers}\r\n"
    ).encode()


async def test_bodies_over_one_mebibyte_are_413(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        exact = orjson.dumps(body_for())
        exact += b" " * (MAX_BODY_BYTES - len(exact))
        assert len(exact) == MAX_BODY_BYTES
        r = await api.client.post(INGEST, content=exact, headers=AUTH)
        assert r.status_code == 200, r.text  # the limit itself is allowed

        # declared too large by Content-Length: refused before a byte of body is sent
        head = post_head(f"Content-Length: {MAX_BODY_BYTES + 1}\r\n")
        status, body = await raw_exchange(api.port, head, [])
        assert status == 413
        assert orjson.loads(body)["error"] == "body_too_large"

        # chunked: no Content-Length, so the streamed bytes are counted; the last chunk
        # sent is the one that crosses the limit, and the terminating chunk never comes
        doc = orjson.dumps(body_for(T0 + 60))
        block = 64 * 1024
        parts = [b"%x\r\n%s\r\n" % (len(doc), doc)]
        sent = len(doc)
        while sent <= MAX_BODY_BYTES:
            parts.append(b"%x\r\n%s\r\n" % (block, b" " * block))
            sent += block
        status, body = await raw_exchange(
            api.port, post_head("Transfer-Encoding: chunked\r\n"), parts
        )
        assert status == 413
        assert orjson.loads(body)["error"] == "body_too_large"
        assert await stored_times(api.store) == [T0]


async def test_a_body_trickled_past_the_body_timeout_is_408_and_closes(tmp_path: Path) -> None:
    """Slow-loris on the body: headers at once, then a byte every 50 ms. Each read is quick
    (Hypercorn would wait forever); the whole body is not: 408, the connection closes,
    nothing is written, the refusal is counted, and other clients are answered meanwhile."""
    timeout_s = 0.5
    more_env = {"TRADE_CANVAS_HTTP_BODY_TIMEOUT_S": f"{timeout_s}"}
    async with running_api(tmp_path, more_env=more_env) as api:
        doc = orjson.dumps(body_for())
        stream = await trio.open_tcp_stream("127.0.0.1", api.port)
        answer = b""
        started = trio.current_time()
        async with stream:
            await stream.send_all(post_head(f"Content-Length: {len(doc)}\r\n"))
            # never the last byte: only the timeout can end this request
            for byte in doc[:-1]:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(bytes([byte]))
                with trio.move_on_after(0.05):  # the trickle's pace, not a wait for the server
                    if not (data := await stream.receive_some()):
                        break  # closed by the daemon
                    answer += data
                assert (await api.client.get("/healthz")).status_code == 200
            else:
                raise AssertionError(f"not closed within {trio.current_time() - started:.1f}s")
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in head.lower()
        doc_back = orjson.loads(body)
        assert doc_back["error"] == "body_timeout"
        assert f"within {timeout_s:g}s" in doc_back["message"]
        assert await stored_times(api.store) == []
        text = (await api.client.get("/metrics")).text
        assert metric_value(text, "tradecanvas_http_refusals", code="body_timeout") == 1
        # a body that comes in time, in pieces, is taken
        status, _ = await raw_exchange(
            api.port, post_head(f"Content-Length: {len(doc)}\r\n"), [doc[:10], doc[10:]]
        )
        assert status == 200
        assert await stored_times(api.store) == [T0]


# --- strict publish and store failures -------------------------------------------------------


async def test_publish_failure_is_503_and_the_candle_stays_committed(tmp_path: Path) -> None:
    async with running_api(tmp_path, fail_publish=True) as api:
        r = await api.client.post(INGEST, json=body_for(), headers=AUTH)
        assert r.status_code == 503
        doc = r.json()
        assert doc["error"] == "publish_failed"
        assert doc["committed"] is True
        assert "committed" in doc["message"]
        assert (doc["series_id"], doc["candle_time"]) == (BTC, T0)
        assert doc["failures"] and "subscriber 7" in doc["failures"][0]
        assert await stored_times(api.store) == [T0]
        text = (await api.client.get("/metrics")).text
        assert metric_value(text, "tradecanvas_publish", path="http") == 1
        assert metric_value(text, "tradecanvas_publish_failed_steps", path="http") == 1
        # GET heals a subscriber: the committed candle is readable
        r = await api.client.get(CANDLES, params={"series_id": BTC})
        assert [c["candle_time"] for c in r.json()["candles"]] == [T0]


async def test_store_failure_is_500_and_readyz_reports_the_store(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        assert (await api.client.get("/readyz")).status_code == 200
        await api.store.aclose()
        r = await api.client.post(INGEST, json=body_for(), headers=AUTH)
        assert r.status_code == 500
        assert r.json()["error"] == "ingest_failed"
        assert "nothing was committed" in r.json()["message"]
        r = await api.client.get(CANDLES, params={"series_id": BTC})
        assert (r.status_code, r.json()["error"]) == (500, "store_failed")
        r = await api.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["store_open"] is False
        assert r.json()["error"] == "not_ready"
        text = (await api.client.get("/metrics")).text
        assert metric_value(text, "tradecanvas_publish", path="http") == 0


# --- reads ---------------------------------------------------------------------------------


async def test_candles_since_limit_and_tail(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        r = await api.client.get(CANDLES, params={"series_id": BTC})
        assert r.json() == {"series_id": BTC, "server_head_time": None, "candles": []}

        minutes = [candle(T0 + 60 * i, "10", "12", "9", str(10 + i % 2), "2") for i in range(600)]
        await api.pipeline.run(IngestBatch.of(SeriesId.parse(BTC), minutes, "rest"))
        head = T0 + 60 * 599

        r = await api.client.get(CANDLES, params={"series_id": BTC})
        doc = r.json()
        assert doc["server_head_time"] == head
        times = [c["candle_time"] for c in doc["candles"]]
        assert len(times) == DEFAULT_LIMIT
        assert times == sorted(times)
        assert times[-1] == head  # no since: the newest `limit`
        assert doc["candles"][-1] == {
            "candle_time": head,
            "open": 10.0,
            "high": 12.0,
            "low": 9.0,
            "close": 11.0,
            "volume": 2.0,
        }

        r = await api.client.get(CANDLES, params={"series_id": BTC, "since": T0, "limit": 3})
        assert [c["candle_time"] for c in r.json()["candles"]] == [T0 + 60, T0 + 120, T0 + 180]

        r = await api.client.get(CANDLES, params={"series_id": BTC, "since": head})
        assert r.json()["candles"] == []
        assert r.json()["server_head_time"] == head

        r = await api.client.get(CANDLES, params={"series_id": BTC, "since": 0, "limit": MAX_LIMIT})
        assert len(r.json()["candles"]) == 600

        # before: the newest below it (paging back in one request, holes or not); with
        # since, the window between, the oldest first
        r = await api.client.get(CANDLES, params={"series_id": BTC, "before": T0 + 600, "limit": 3})
        assert [c["candle_time"] for c in r.json()["candles"]] == [T0 + 420, T0 + 480, T0 + 540]
        r = await api.client.get(CANDLES, params={"series_id": BTC, "before": T0})
        assert r.json()["candles"] == []
        window: dict[str, str | int] = {
            "series_id": BTC,
            "since": T0 + 60,
            "before": T0 + 300,
            "limit": 100,
        }
        r = await api.client.get(CANDLES, params=window)
        assert [c["candle_time"] for c in r.json()["candles"]] == [T0 + 120, T0 + 180, T0 + 240]

        r = await api.client.get(CANDLES, params={"series_id": BTC5, "limit": 2})
        assert [c["candle_time"] for c in r.json()["candles"]] == [T0 + 118 * 300, T0 + 119 * 300]
        assert r.json()["candles"][-1]["volume"] == 10.0


# every bad query's refusal is tests/serve/test_http_validation.py's; a sample here
@pytest.mark.parametrize(
    ("params", "fields"),
    [
        ({"series_id": "nope", "since": "x", "limit": "-1"}, ["series_id", "since", "limit"]),
        ([("series_id", BTC), ("series_id", ETH)], ["series_id"]),
    ],
)
async def test_bad_candle_queries_are_422_naming_each_parameter(
    tmp_path: Path, params: Any, fields: list[str]
) -> None:
    async with running_api(tmp_path) as api:
        r = await api.client.get(CANDLES, params=params)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == "bad_request"
        assert [e["field"] for e in r.json()["errors"]] == fields
        for field in fields:
            assert f"{field}:" in r.json()["message"]


async def test_unknown_series_is_404(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        for sid, hint in (
            ("binance:futures:SOL/USDT:1m", "/api/market/series"),
            ("binance:spot:BTC/USDT:1m", "/api/market/series"),
            ("binance:futures:BTC/USDT:15m", "binance:futures:BTC/USDT is served in 1m, 5m"),
        ):
            r = await api.client.get(CANDLES, params={"series_id": sid})
            assert r.status_code == 404
            assert r.json()["error"] == "unknown_series"
            assert hint in r.json()["message"]


async def test_series_lists_base_and_derived_with_head_and_lag(tmp_path: Path) -> None:
    now = float(T0 + 10 * 60 + 15)
    async with running_api(tmp_path, clock=lambda: now) as api:
        await api.pipeline.run(IngestBatch.of(SeriesId.parse(BTC), flat_minutes(T0, 10), "rest"))
        r = await api.client.get("/api/market/series")
        assert r.status_code == 200
        rows = {row["series_id"]: row for row in r.json()["series"]}
        assert list(rows) == [BTC, ETH, BTC5, "binance:spot:ETH/USDT:5m"]
        assert rows[BTC] == {
            "series_id": BTC,
            "kind": "base",
            "base_series_id": BTC,
            "timeframe": "1m",
            "head_time": T0 + 540,
            "first_time": T0,
            "candles": 10,
            "lag_seconds": 15.0,  # the head bar closed at T0+600, now is T0+615
        }
        assert rows[BTC5]["kind"] == "derived"
        assert rows[BTC5]["base_series_id"] == BTC
        assert (rows[BTC5]["head_time"], rows[BTC5]["candles"]) == (T0 + 300, 2)
        assert rows[BTC5]["lag_seconds"] == 15.0
        assert rows[ETH]["head_time"] is None
        assert rows[ETH]["lag_seconds"] is None
        assert rows[ETH]["candles"] == 0


# --- health, readiness, metrics, routing ---------------------------------------------------------


async def test_healthz_and_readyz(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        r = await api.client.get("/healthz")
        body = {"status": "ok", "upstream": "connected", "connections": None}
        assert (r.status_code, r.json()) == (200, body)
        r = await api.client.get("/readyz")
        assert r.status_code == 200
        assert r.json() == {
            "ready": True,
            "checks": {"store_open": True, "listeners_bound": True, "upstream_connected": True},
        }
        api.ready["upstream_connected"] = False
        r = await api.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["upstream_connected"] is False
        assert r.json()["message"] == "not ready: upstream_connected"
        assert (await api.client.get("/healthz")).status_code == 200  # alive though not ready


async def test_readyz_is_503_when_the_readiness_callable_raises(tmp_path: Path) -> None:
    def broken() -> dict[str, bool]:
        raise RuntimeError("boom")

    async with running_api(tmp_path, readiness=broken) as api:
        r = await api.client.get("/readyz")
        assert r.status_code == 503
        assert r.json()["checks"]["readiness_check"] is False


async def test_metrics_are_prometheus_text_with_the_http_publish_count(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        for i in range(3):
            r = await api.client.post(INGEST, json=body_for(T0 + 60 * i), headers=AUTH)
            assert r.status_code == 200
        r = await api.client.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"] == CONTENT_TYPE_LATEST
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        publish = families["tradecanvas_publish"]
        assert publish.type == "counter"
        by_path = {s.labels["path"]: s.value for s in publish.samples}
        assert by_path == {"legacy": 0.0, "pipeline": 0.0, "http": 3.0}
        assert metric_value(r.text, "tradecanvas_candles_committed") == 3.0
        assert "tradecanvas_ingest_latency_seconds" in families


async def test_unknown_routes_and_methods_answer_json(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        r = await api.client.get("/api/market/nope")
        assert (r.status_code, r.json()["error"]) == (404, "not_found")
        r = await api.client.get(INGEST)
        assert (r.status_code, r.json()["error"]) == (405, "method_not_allowed")
        assert "POST" in r.headers["allow"]


async def test_the_token_never_reaches_the_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_api(tmp_path, fail_publish=True) as api:
        await api.client.post(INGEST, json=body_for(), headers=AUTH)
        await api.client.post(
            INGEST, json=body_for(), headers={"Authorization": "Bearer x" + TOKEN}
        )
        await api.client.post(INGEST, content=b"{", headers=AUTH)
    assert caplog.records  # the failed publish was logged…
    assert TOKEN not in caplog.text  # …without the token


# --- serving: port 0, bind errors, graceful drain --------------------------------------------


class StartedMarker:
    """ASGI middleware that sets ``started`` when a request for ``path`` reaches the app."""

    def __init__(self, app: ASGIApp, path: str) -> None:
        self.app = app
        self.path = path
        self.started = trio.Event()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == self.path:
            self.started.set()
        await self.app(scope, receive, send)


@asynccontextmanager
async def bare_app(tmp_path: Path) -> AsyncIterator[tuple[ASGIApp, CandleStore]]:
    flags = build_runtime_flags(
        {"TRADE_CANVAS_INGEST_TOKEN": TOKEN, "TRADE_CANVAS_DB_PATH": str(tmp_path / "m.sqlite3")}
    ).flags
    store = await CandleStore.open(flags.db_path)
    try:
        pipeline = IngestPipeline(
            store, RecordingTarget(), flags.derived_timeframes, flags.derivation_fingerprint()
        )
        yield (
            build_http_app(
                store=store,
                pipeline=pipeline,
                flags=flags,
                metrics=Metrics(),
                readiness=lambda: {},
            ),
            store,
        )
    finally:
        await store.aclose()


async def test_bind_failure_raises_oserror(tmp_path: Path) -> None:
    async with bare_app(tmp_path) as (app, _):
        sock = trio.socket.socket()
        with sock:
            await sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]
            with pytest.raises(OSError, match="in use"):
                await serve_http(app, host="127.0.0.1", port=port)
            # the listener that holds the port is untouched
            client = await trio.open_tcp_stream("127.0.0.1", port)
            await client.aclose()


async def _post_in_two_parts(
    client: httpx.AsyncClient, proceed: trio.Event, out: list[httpx.Response]
) -> None:
    raw = orjson.dumps(body_for())

    async def parts() -> AsyncIterator[bytes]:
        yield raw[:20]
        await proceed.wait()
        yield raw[20:]

    out.append(await client.post(INGEST, content=parts(), headers=AUTH))


async def test_cancel_drains_in_flight_requests_and_refuses_new_ones(tmp_path: Path) -> None:
    async with bare_app(tmp_path) as (inner, store):
        app = StartedMarker(inner, INGEST)
        proceed = trio.Event()
        responses: list[httpx.Response] = []
        server = StoppableServer(app)
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(server.run)
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
                trio.open_nursery() as clients,
            ):
                clients.start_soon(_post_in_two_parts, client, proceed, responses)
                await app.started.wait()
                server.scope.cancel()
                await trio.testing.wait_all_tasks_blocked()
                assert not server.done.is_set()  # draining: the request is in flight
                with pytest.raises(OSError, match="connect"):  # but no new connection is accepted
                    await trio.open_tcp_stream("127.0.0.1", port)
                proceed.set()
            with trio.fail_after(5):
                await server.done.wait()
        assert [r.status_code for r in responses] == [200]
        assert [s.candle.candle_time for s in await store.range(BTC, 0, 2**40)] == [T0]


async def test_drain_is_bounded_by_a_deadline(tmp_path: Path) -> None:
    drain_s = 0.3
    async with bare_app(tmp_path) as (inner, store):
        app = StartedMarker(inner, INGEST)
        never = trio.Event()
        server = StoppableServer(app, drain_s)
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(server.run)
            async with (
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
                trio.open_nursery() as clients,
            ):
                # this client stays connected and never finishes its body
                clients.start_soon(_post_in_two_parts, client, never, [])
                await app.started.wait()
                began = trio.current_time()
                server.scope.cancel()
                with trio.fail_after(drain_s + 5):
                    await server.done.wait()
                elapsed = trio.current_time() - began
                clients.cancel_scope.cancel()
        assert drain_s * 0.9 <= elapsed < drain_s + 1.5
        assert await store.range(BTC, 0, 2**40) == []


async def test_a_derived_bar_with_minutes_missing_says_so(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        btc = SeriesId.parse(BTC)
        minutes = list(flat_minutes(T0, 5))
        # the fourth minute is missing: the 5m bar is derived from four
        await api.pipeline.run(IngestBatch.of(btc, minutes[:3] + minutes[4:], "ws"))
        url = f"/api/market/candles?series_id={BTC5}"
        [bar] = (await api.client.get(url)).json()["candles"]
        assert bar["candle_time"] == T0 and bar["complete"] is False
        # the base series' candles carry no mark
        assert all("complete" not in c for c in (await api.client.get(
            f"/api/market/candles?series_id={BTC}")).json()["candles"])  # fmt: skip
        await api.pipeline.run(IngestBatch.of(btc, minutes[3:4], "rest"))
        [bar] = (await api.client.get(url)).json()["candles"]
        assert bar["candle_time"] == T0 and "complete" not in bar


async def test_events_are_paged_by_cursor_and_filtered_by_series(tmp_path: Path) -> None:
    async with running_api(tmp_path) as api:
        btc, eth = SeriesId.parse(BTC), SeriesId.parse(ETH)
        await api.pipeline.run(IngestBatch.of(btc, flat_minutes(1_700_000_100, 6), "ws"))
        await api.pipeline.run(IngestBatch.of(eth, flat_minutes(1_700_000_100, 6), "ws"))
        everything = (await api.client.get("/api/market/events")).json()
        ids = [e["event_id"] for e in everything["events"]]
        assert ids == sorted(ids) and len(ids) == 4  # new_series of 1m and 5m, each symbol
        assert everything["truncated"] is False and everything["next_after"] == ids[-1]
        assert {e["type"] for e in everything["events"]} == {"system"}
        page = (await api.client.get(f"/api/market/events?after={ids[0]}&limit=2")).json()
        assert [e["event_id"] for e in page["events"]] == ids[1:3]
        assert page["more"] is True and page["next_after"] == ids[2]
        only_eth = (await api.client.get(f"/api/market/events?series_id={ETH}")).json()
        assert {e["series_id"] for e in only_eth["events"]} == {ETH}
        bad = await api.client.get("/api/market/events?after=-1&limit=0")
        assert bad.status_code == 422
        assert {p["field"] for p in bad.json()["errors"]} == {"after", "limit"}
        unknown = await api.client.get("/api/market/events?series_id=binance:spot:XRP/USDT:1m")
        assert unknown.status_code == 404
        # at the newest id: nothing more, nothing wrong
        done = (await api.client.get(f"/api/market/events?after={ids[-1]}")).json()
        assert (done["events"], done["next_after"], done["truncated"]) == ([], ids[-1], False)
        # above it (a store restored from an older backup): start over from the newest
        ahead = (await api.client.get(f"/api/market/events?after={ids[-1] + 50}")).json()
        assert (ahead["events"], ahead["next_after"], ahead["truncated"]) == ([], ids[-1], True)
