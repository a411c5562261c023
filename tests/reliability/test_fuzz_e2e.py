"""Issue 17 item 5 over real sockets: hypothesis-made requests to a running ``tradecanvas
serve`` (fed by ``tradecanvas replay``), through Hypercorn and the WebSocket server.

- ``POST /api/market/ingest/candle_closed`` with the token and a fuzzed body: 200 only for a
  body the validator accepts, else 422 (never 5xx), and then nothing is written (the
  store's candle count and newest event_id do not move);
- ``GET /api/market/candles`` and ``/api/market/events`` with fuzzed query strings: 200,
  404 or 422, never 5xx;
- fuzzed subscriber messages on /ws/market: every message the protocol refuses gets exactly
  one ``error`` reply, the others none, and the connection stays up (a ``ping`` still gets
  its ``pong``).

Afterwards the daemon is alive and stops cleanly (exit 0). Seeded; sized like test_fuzz.py.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final
from urllib.parse import quote

import httpx
import orjson
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from tests.cli_rig import Children, cli_env, wait_for_line
from tests.reliability.rig import (
    WAIT_S,
    connect,
    db_connect,
    generate_candles,
    start_serve,
    write_csv,
)
from tests.reliability.test_fuzz import (
    BODIES,
    BTC,
    JSON,
    QUERY,
    SETTINGS,
    SUBSCRIBE,
    dumps,
    mutated,
    report_counts,
)
from tradecanvas.errors import ClientMessageError
from tradecanvas.serve.http_validation import RequestRefused, parse_ingest_body
from tradecanvas.serve.ws_protocol import parse_client_message

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

TOKEN: Final = "reliability-fuzz-token-0123456789"


def stored_count(db: Path) -> int:
    if not db.exists():
        return 0
    with contextlib.closing(db_connect(db)) as conn:
        query = "SELECT COUNT(*) FROM candles WHERE series_id = ?"
        return int(conn.execute(query, (str(BTC),)).fetchone()[0])


class Daemon:
    def __init__(self, proc: subprocess.Popen[bytes], ws: str, http: str, db: Path) -> None:
        self.proc, self.ws, self.http, self.db = proc, ws, http, db

    def written(self) -> tuple[int, int]:
        """(candles stored, newest event_id): what a write would move."""
        with contextlib.closing(db_connect(self.db)) as conn:
            candles = conn.execute("SELECT COUNT(*) FROM candles").fetchone()[0]
            event = conn.execute("SELECT COALESCE(MAX(event_id), 0) FROM events").fetchone()[0]
        return int(candles), int(event)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    tmp = tmp_path_factory.mktemp("fuzz-e2e")
    csv = write_csv(tmp / "BTCUSDT-1m-fuzz.csv", generate_candles(17, 300))
    kids = Children()
    try:
        replay = kids.start(
            ["replay", str(csv), "--speed", "max"], tmp / "replay.log", {**os.environ}
        )
        wait_line = functools.partial(wait_for_line, within=WAIT_S)
        match = trio.run(wait_line, tmp / "replay.log", r"replay ws=(\S+) rest=(\S+)", replay)
        db = tmp / "market.sqlite3"
        env = cli_env(
            TRADE_CANVAS_DB_PATH=str(db),
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=match.group(1),
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=match.group(2),
            TRADE_CANVAS_INGEST_TOKEN=TOKEN,
        )
        proc, ws, http = trio.run(start_serve, kids, tmp / "serve.log", env)
        # the replay's data is in: from now on only the fuzzed writes could change the store
        trio.run(wait_line, tmp / "replay.log", r"replay finished", replay)
        deadline = time.monotonic() + 60
        while stored_count(db) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the store until the ingest has committed it all
        yield Daemon(proc, ws, http, db)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        kids.kill_all()


def test_fuzzed_write_bodies_are_refused_and_write_nothing(daemon: Daemon) -> None:
    counts: Counter[str] = Counter()
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    with httpx.Client(base_url=daemon.http, timeout=30) as client:

        @SETTINGS
        @given(BODIES)
        def one(raw: bytes) -> None:
            counts["tried"] += 1
            before = daemon.written()
            answer = client.post("/api/market/ingest/candle_closed", content=raw, headers=headers)
            try:
                parse_ingest_body(raw, frozenset({BTC}), now=time.time())
                valid = True
            except RequestRefused:
                valid = False
            if answer.status_code >= 500:
                counts["crashed"] += 1
            if valid:
                assert answer.status_code == 200, answer.text
                counts["accepted"] += 1
            else:
                assert answer.status_code == 422, answer.text
                assert answer.json()["error"] and daemon.written() == before
                counts["refused"] += 1

        one()
    report_counts("fuzz_e2e[http_body]", counts)


def test_fuzzed_query_strings_get_4xx_never_5xx(daemon: Daemon) -> None:
    counts: Counter[str] = Counter()
    with httpx.Client(base_url=daemon.http, timeout=30) as client:

        @SETTINGS
        @given(QUERY)
        def one(query: str) -> None:
            for path in ("/api/market/candles", "/api/market/events"):
                counts["tried"] += 1
                # what a client can put on the request line: the text percent-encoded
                answer = client.get(f"{path}?{quote(query, safe='=&;%+/:,')}")
                if answer.status_code >= 500:
                    counts["crashed"] += 1
                assert answer.status_code in (200, 404, 422), (query, answer.text)
                counts["accepted" if answer.status_code == 200 else "refused"] += 1

        one()
    report_counts("fuzz_e2e[http_query]", counts)


async def _errors_for(url: str, message: str | bytes) -> list[dict[str, Any]]:
    """The error replies to ``message`` (before the pong of a following ping)."""
    errors: list[dict[str, Any]] = []
    async with connect(url) as ws:
        await ws.send_message(message)
        await ws.send_message('{"type": "ping"}')
        with trio.fail_after(30):
            while (reply := orjson.loads(await ws.get_message()))["type"] != "pong":
                if reply["type"] == "error":
                    errors.append(reply)
    return errors


def test_fuzzed_subscriber_messages_get_one_error_each(daemon: Daemon) -> None:
    counts: Counter[str] = Counter()

    @SETTINGS
    @given(
        st.text(max_size=200)
        | JSON.map(lambda doc: dumps(doc).decode())
        | mutated(SUBSCRIBE).map(lambda doc: dumps(doc).decode())
    )
    def one(message: str) -> None:
        counts["tried"] += 1
        try:
            parse_client_message(message)
            refused = False
        except ClientMessageError:
            refused = True
        errors = trio.run(_errors_for, daemon.ws, message)
        if refused:
            assert len(errors) == 1, (message, errors)
            counts["refused"] += 1
        else:
            # a well-formed subscribe to a series the daemon does not serve is refused
            # by the session (unknown_series), not by the parser
            assert [e["code"] for e in errors] in ([], ["unknown_series"]), (message, errors)
            counts["accepted"] += 1

    one()
    report_counts("fuzz_e2e[subscriber_message]", counts)
