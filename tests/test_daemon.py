"""The real ``tradecanvas serve`` in a subprocess: READY/STOPPING over a real notify socket,
SIGTERM during a flush loses nothing, SIGTERM closes /ws/market subscribers on both ports
with 1001 and exits in time whatever a client does, a store failure is one log line and a
non-zero exit."""

from __future__ import annotations

import functools
import json
import re
import signal
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import trio

from tests.cli_rig import cli_env, exit_code_within, run_cli, wait_for_line
from tests.conftest import binance_data_dir
from tests.serve.test_ws_server import close_code_of, connect, until_pong
from tradecanvas.daemon import market_runtime_builder, run_daemon
from tradecanvas.errors import ExitCode
from tradecanvas.runtime_flags import build_runtime_flags
from tradecanvas.wire.json import dumps, loads

TOKEN = "daemon-test-ingest-token-0123456789"

WEEK = "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
BASE = "binance:futures:BTC/USDT:1m"
# an upgrade request for /ws/market, sent raw by a client that then never reads or answers
SILENT_UPGRADE = (
    b"GET /ws/market HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)

pytestmark = pytest.mark.e2e  # every test here runs the real CLI in subprocesses


async def test_sigterm_during_a_flush_loses_nothing_and_notifies_systemd(tmp_path: Path) -> None:
    notify = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    await notify.bind(str(tmp_path / "notify.sock"))
    csv = binance_data_dir() / WEEK
    with (
        run_cli(
            ["replay", "--speed", "240", "--start-at", "30", str(csv)],
            cli_env(),
            tmp_path / "replay.log",
        ) as replay,
    ):
        found = await wait_for_line(tmp_path / "replay.log", r"replay ws=(\S+) rest=(\S+)", replay)
        url, rest_url = found.group(1), found.group(2)
        db = tmp_path / "m.sqlite3"
        env = cli_env(
            TRADE_CANVAS_DB_PATH=str(db),
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL=url,
            TRADE_CANVAS_BINANCE_FUTURES_REST_URL=rest_url,
            TRADE_CANVAS_INITIAL_BACKFILL_CANDLES="30",
            # closed klines pile up in the batch: nothing is flushed before the SIGTERM
            TRADE_CANVAS_BINANCE_WS_FLUSH_S="60",
            TRADE_CANVAS_BINANCE_WS_BATCH_MAX="100000",
            NOTIFY_SOCKET=str(tmp_path / "notify.sock"),
        )
        with run_cli(["serve"], env, tmp_path / "serve.log") as serve:
            with trio.fail_after(30):
                assert b"READY=1" in await notify.recv(4096)
            ws_port = int(
                (
                    await wait_for_line(
                        tmp_path / "serve.log", r"ready ws=ws://[\d.]+:(\d+)", serve
                    )
                ).group(1)
            )
            forming_max = 0
            async with connect(ws_port) as ws:
                await ws.send_message(dumps({"type": "subscribe", "series_id": BASE}))
                with trio.fail_after(30):
                    # a forming candle of minute t means the replay sent the closes before t
                    while forming_max < 1751760000 + 60 * 40:
                        message = loads(await ws.get_message())
                        if message["type"] == "candle_forming":
                            forming_max = max(forming_max, message["candle"]["candle_time"])
                serve.send_signal(signal.SIGTERM)
                assert await exit_code_within(serve, within=10) == 0
            statuses: list[bytes] = []
            with trio.move_on_after(2):
                while b"STOPPING=1" not in b"".join(statuses):
                    statuses.append(await notify.recv(4096))
            assert any(b"STOPPING=1" in s for s in statuses)
    notify.close()
    conn = sqlite3.connect(db)
    times = [
        t for (t,) in conn.execute(
            "SELECT candle_time FROM candles WHERE series_id = ? ORDER BY candle_time", (BASE,)
        )
    ]  # fmt: skip
    conn.close()
    # every minute from the first through the last one closed before the SIGTERM is stored
    expected = list(range(1751760000, forming_max, 60))
    assert times[: len(expected)] == expected
    assert len(times) >= 40


def test_store_failure_is_one_clear_line_and_a_non_zero_exit(tmp_path: Path) -> None:
    db = tmp_path / "market.sqlite3"
    db.write_bytes(b"definitely not an SQLite file " * 200)
    proc = subprocess.run(
        [sys.executable, "-m", "tradecanvas", "serve"],
        env=cli_env(TRADE_CANVAS_DB_PATH=str(db)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == ExitCode.STORE_FAILURE
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "store failure" in lines[0]
    assert str(db) in lines[0]
    assert db.read_bytes().startswith(b"definitely not")  # nothing was written to it


@pytest.mark.parametrize("port_role", ["HTTP", "WS"])
def test_a_port_in_use_is_one_clear_line_and_exit_1(tmp_path: Path, port_role: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "tradecanvas", "serve"],
            env=cli_env(
                TRADE_CANVAS_DB_PATH=str(tmp_path / "market.sqlite3"),
                **{f"TRADE_CANVAS_{port_role}_PORT": str(port)},
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == ExitCode.FAILED
    assert "Traceback" not in proc.stderr, proc.stderr
    what = "HTTP" if port_role == "HTTP" else "WebSocket clients"
    flag = f"TRADE_CANVAS_{'HTTP' if port_role == 'HTTP' else 'WS'}_PORT"
    expected = (
        f"cannot start: cannot listen for {what} on 127.0.0.1:{port}: Address already in use"
        f" (another tradecanvas serve, or another program? give this one {flag})"
    )
    # one line, said before the store is opened: nothing written for a run that never served
    assert proc.stderr.splitlines() == [f"CRITICAL tradecanvas.daemon: {expected}"]
    assert not (tmp_path / "market.sqlite3").exists()


def test_bad_flag_stops_serve_with_exit_2() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tradecanvas", "serve"],
        env=cli_env(TRADE_CANVAS_WS_PORT="eighty"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("tradecanvas: TRADE_CANVAS_WS_PORT: ")


def test_binances_futures_host_without_the_market_route_stops_serve_with_exit_2(
    tmp_path: Path,
) -> None:
    """It would connect and never get a kline (BINANCE.md): refused at start-up, in one
    line, before the store is opened."""
    db = tmp_path / "market.sqlite3"
    proc = subprocess.run(
        [sys.executable, "-m", "tradecanvas", "serve"],
        env=cli_env(
            TRADE_CANVAS_DB_PATH=str(db),
            TRADE_CANVAS_BINANCE_FUTURES_WS_URL="wss://fstream.binance.com",
        ),
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert proc.returncode == ExitCode.USAGE
    assert proc.stderr.splitlines() == [
        "CRITICAL tradecanvas.daemon: cannot start: TRADE_CANVAS_BINANCE_FUTURES_WS_URL:"
        " 'wss://fstream.binance.com' lacks the /market route: fstream.binance.com sends an"
        " unrouted futures connection no kline frames (since 2026-04-23); allowed:"
        " wss://fstream.binance.com/market"
    ], proc.stderr
    assert not db.exists()


async def test_a_second_signal_exits_at_once(tmp_path: Path) -> None:
    """While the first SIGTERM's drain waits on a client that never answers the close
    handshake, a second SIGTERM ends the process at once."""
    env = cli_env(
        TRADE_CANVAS_DB_PATH=str(tmp_path / "m.sqlite3"),
        # no upstream here: an unreachable loopback port keeps the ingest reconnecting
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL="ws://127.0.0.1:9",
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL="http://127.0.0.1:9",
    )
    log = tmp_path / "serve.log"
    with run_cli(["serve"], env, log) as serve:
        port = int((await wait_for_line(log, r"ready ws=ws://[\d.]+:(\d+)", serve)).group(1))
        # a client that upgrades and then never reads or answers anything
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(SILENT_UPGRADE)
        assert b"101" in await stream.receive_some(4096)
        serve.send_signal(signal.SIGTERM)
        await wait_for_line(log, r"SIGTERM: shutting down", serve)
        assert serve.poll() is None  # still draining: the silent client holds the close
        serve.send_signal(signal.SIGTERM)
        assert await exit_code_within(serve, within=2) == 128 + signal.SIGTERM
        await stream.aclose()
    assert "second SIGTERM: exiting at once" in log.read_text()


async def test_sigterm_closes_subscribers_on_both_ports_and_exits_in_time(tmp_path: Path) -> None:
    """A subscriber on the WS port and one on the HTTP port get 1001; a client on the HTTP
    port that never reads or answers holds nothing up: its close is abandoned, its
    connection aborted, and the daemon exits 0 within its 10 s."""
    env = cli_env(
        TRADE_CANVAS_DB_PATH=str(tmp_path / "m.sqlite3"),
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL="ws://127.0.0.1:9",
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL="http://127.0.0.1:9",
    )
    log = tmp_path / "serve.log"
    with run_cli(["serve"], env, log) as serve:
        ready = await wait_for_line(
            log, r"ready ws=ws://[\d.]+:(\d+)/ws/market http=http://[\d.]+:(\d+)", serve
        )
        ports = {"ws": int(ready.group(1)), "http": int(ready.group(2))}
        silent = await trio.open_tcp_stream("127.0.0.1", ports["http"])
        await silent.send_all(SILENT_UPGRADE)
        assert (await silent.receive_some(4096)).startswith(b"HTTP/1.1 101")
        codes: dict[str, int | None] = {}
        async with trio.open_nursery() as nursery:
            subscribed = {name: trio.Event() for name in ports}

            async def subscriber(name: str) -> None:
                async with connect(ports[name]) as ws:
                    await ws.send_message(dumps({"type": "subscribe", "series_id": BASE}))
                    await until_pong(ws)
                    subscribed[name].set()
                    codes[name] = await close_code_of(ws)

            for name in ports:
                nursery.start_soon(subscriber, name)
            with trio.fail_after(30):
                for event in subscribed.values():
                    await event.wait()
            began = trio.current_time()
            serve.send_signal(signal.SIGTERM)
            assert await exit_code_within(serve, within=10) == 0
            took = trio.current_time() - began
        await silent.aclose()
    assert codes == {"ws": 1001, "http": 1001}
    assert took < 10


async def test_sighup_is_ignored_saying_so_and_a_deleted_store_stops_the_daemon(
    tmp_path: Path,
) -> None:
    """SIGHUP (sent for a reload by habit) used to kill the process without a word; a store
    file deleted under the daemon took every later commit with it, silently."""
    db = tmp_path / "m.sqlite3"
    env = cli_env(
        TRADE_CANVAS_DB_PATH=str(db),
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL="ws://127.0.0.1:9",
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL="http://127.0.0.1:9",
    )
    log = tmp_path / "serve.log"
    with run_cli(["serve"], env, log) as serve:
        await wait_for_line(log, r"tradecanvas ready", serve)
        assert "created a new, empty store" in log.read_text()
        serve.send_signal(signal.SIGHUP)
        await wait_for_line(log, r"SIGHUP ignored: settings are read once", serve)
        assert serve.poll() is None
        db.unlink()
        assert await exit_code_within(serve, within=30) == ExitCode.STORE_FAILURE
    assert re.search(
        r"CRITICAL .*store failure, stopping \(exit code 3\): candle store \S+m\.sqlite3 was"
        r" deleted while the daemon had it open",
        log.read_text(),
    ), log.read_text()


async def test_a_write_waiting_on_another_process_lock_shows_on_readyz(tmp_path: Path) -> None:
    """A `sqlite3` shell left inside a transaction holds the write lock: the daemon's commit
    waits for it (up to 30 s, then exit 3). It used to look healthy meanwhile."""
    db = tmp_path / "m.sqlite3"
    flags = build_runtime_flags(
        {
            "TRADE_CANVAS_DB_PATH": str(db),
            "TRADE_CANVAS_WS_PORT": "0",
            "TRADE_CANVAS_HTTP_PORT": "0",
            "TRADE_CANVAS_INGEST_TOKEN": TOKEN,
            "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": "ws://127.0.0.1:9",
            "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": "http://127.0.0.1:9",
        }
    ).flags
    runtime = await market_runtime_builder(flags)
    stop = trio.Event()
    written: list[int] = []
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        ports = await nursery.start(functools.partial(run_daemon, runtime, stop=stop))
        base = f"http://127.0.0.1:{ports['http']}"
        async with httpx.AsyncClient(base_url=base, timeout=60) as client:

            async def progressing() -> bool:
                doc = (await client.get("/readyz")).json()
                return bool(doc["checks"]["store_writes_progressing"])

            async def write() -> None:
                candle = {"candle_time": 1_751_760_000, "open": 1, "high": 2, "low": 1,
                          "close": 2, "volume": 3}  # fmt: skip
                answer = await client.post(
                    "/api/market/ingest/candle_closed",
                    json={"series_id": "binance:futures:BTC/USDT:1m", "candle": candle},
                    headers={"Authorization": f"Bearer {TOKEN}"},
                )
                written.append(answer.status_code)
                done.set()

            assert await progressing()
            lock = sqlite3.connect(db, isolation_level=None)
            lock.execute("BEGIN EXCLUSIVE")
            nursery.start_soon(write)
            with trio.fail_after(30):
                while True:
                    if not await progressing():
                        break
                    await trio.sleep(0.2)  # polling /readyz, as a balancer does
            metrics = (await client.get("/metrics")).text
            running = re.search(r"^tradecanvas_store_write_running_seconds (\S+)$", metrics, re.M)
            assert running is not None and float(running.group(1)) >= 10
            lock.execute("ROLLBACK")
            lock.close()
            with trio.fail_after(30):
                await done.wait()
            assert written == [200] and await progressing()
        stop.set()
    await runtime.store.aclose()


def test_in_json_every_line_of_serve_is_json_its_flag_warnings_too(tmp_path: Path) -> None:
    """The warnings about the flags (an unknown variable) were written before the daemon set
    up its log format, so `TRADE_CANVAS_LOG_FORMAT=json` still gave a plain-text line first
    and `journalctl -o cat | jq` stopped at it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "tradecanvas", "serve"],
            env=cli_env(
                TRADE_CANVAS_DB_PATH=str(tmp_path / "market.sqlite3"),
                TRADE_CANVAS_HTTP_PORT=str(taken.getsockname()[1]),
                TRADE_CANVAS_LOG_FORMAT="json",
                TRADE_CANVAS_SERIEZ="binance:futures:BTC/USDT:1m",
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert proc.returncode == ExitCode.FAILED
    records = [json.loads(line) for line in proc.stderr.splitlines()]
    assert [r["level"] for r in records] == ["WARNING", "CRITICAL"], proc.stderr
    assert records[0]["message"].startswith("TRADE_CANVAS_SERIEZ: unknown variable, ignored")
