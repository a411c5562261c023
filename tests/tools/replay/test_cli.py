"""``tradecanvas replay``'s command line: options to ReplayConfig in-process, and the real
process (``python -m tradecanvas.tools.replay``) for signals, output and exit codes."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import trio
import trio_websocket

from tests.tools.replay.conftest import DAY, STREAM, read_events
from tradecanvas.tools.replay import ReplayError, config_from_args, configure_parser
from tradecanvas.upstream.ws_client import open_websocket_client


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="tradecanvas replay")
    configure_parser(parser)
    return parser.parse_args(argv)


def test_options_become_the_config(day_csv: Path) -> None:
    config = config_from_args(
        parse(
            str(day_csv),
            "--history",
            str(day_csv),
            "--speed",
            "max",
            "--omit-close",
            "3,5",
            "--omit-close",
            "9",
            "--duplicate-close-every",
            "4",
            "--exchange-hole",
            "10:2",
            "--exchange-hole",
            "20",
            "--drop-at",
            "7",
            "--paused",
        )
    )
    assert [f.stream for f in config.files] == [True, False]
    assert config.speed is None and config.paused
    assert config.omit_closes == frozenset({3, 5, 9}) and config.duplicate_close_every == 4
    assert config.exchange_holes == ((10, 2), (20, 1)) and config.drop_at == (7,)
    assert config_from_args(parse(str(day_csv), "--speed", "2.5")).speed == 2.5
    assert config.phase_3d_days is None
    assert config_from_args(parse(str(day_csv), "--phase-3d", "1")).phase_3d_days == 1


def test_a_3d_phase_other_than_0_1_or_2_is_a_usage_error(
    day_csv: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(str(day_csv), "--phase-3d", "3")
    assert exited.value.code == 2 and "--phase-3d" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["missing.csv"], "missing.csv: no such file"),
        (["DAY", "--speed", "fast"], "--speed 'fast': a positive number or max"),
        (["DAY", "--speed", "0"], "--speed '0': a positive number or max"),
        (["DAY", "--speed", "inf"], "--speed 'inf': a positive number or max"),
        ([], "no files"),
        (["DAY", "--omit-close", "x"], "bad bar index"),
        (["DAY", "--omit-close-every", "0"], "--omit-close-every must be at least 1"),
        (["DAY", "--skip", "-1"], "must not be negative"),
        (["DAY", "--weight-limit", "0"], "--weight-limit must be at least 1"),
    ],
)
def test_bad_options_are_replay_errors_naming_them(
    day_csv: Path, argv: list[str], message: str
) -> None:
    args = parse(*[str(day_csv) if a == "DAY" else a for a in argv])
    with pytest.raises(ReplayError) as raised:
        config_from_args(args)
    assert message in str(raised.value)


def run_cli(*args: str, entry: str = "tradecanvas.tools.replay") -> subprocess.Popen[str]:
    """The replay's stand-alone entry point (``entry="tradecanvas"``: the ``tradecanvas``
    command, then ``args`` begin with ``replay``)."""
    return subprocess.Popen(
        [sys.executable, "-m", entry, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


# a safety net against a hang, not a speed check: the REST drain is DRAIN_S, then the
# connections still open are aborted
EXIT_WITHIN_S = 30.0


async def exit_code(process: subprocess.Popen[str], signum: signal.Signals) -> int:
    """Send ``signum``; the exit code. A replay that does not exit fails the test (and is
    killed on the way out of ``run_cli``'s block)."""
    process.send_signal(signum)
    try:
        with trio.fail_after(EXIT_WITHIN_S):
            return await trio.to_thread.run_sync(process.wait, abandon_on_cancel=True)
    finally:
        if process.poll() is None:
            process.kill()


@pytest.mark.e2e
async def test_cli_prints_its_urls_serves_and_stops_on_sigterm(day_csv: Path) -> None:
    with run_cli(str(day_csv), "--speed", "max", "--start-at", "1438", "--port", "0") as process:
        try:
            assert process.stdout is not None
            line = await trio.to_thread.run_sync(process.stdout.readline)
            assert line.startswith("replay ws=ws://127.0.0.1:")
            assert " rest=http://127.0.0.1:" in line
            ws_url = line.split()[1].removeprefix("ws=")
            url = f"{ws_url}/stream?streams={STREAM}"
            async with open_websocket_client(url) as ws:
                events = await read_events(ws, 8)
            assert sum(e.closed for e in events) == 2
            done = await trio.to_thread.run_sync(process.stdout.readline)
            assert done.startswith("replay finished bars=1440")
        finally:
            code = await exit_code(process, signal.SIGTERM)
    assert code == 0


@pytest.mark.e2e
async def test_cli_paused_starts_on_sigusr1(day_csv: Path) -> None:
    with run_cli(str(day_csv), "--speed", "max", "--start-at", "1438", "--paused") as process:
        try:
            assert process.stdout is not None
            line = await trio.to_thread.run_sync(process.stdout.readline)
            assert line.rstrip().endswith(" paused (SIGUSR1 starts it)")
            ws_url = line.split()[1].removeprefix("ws=")
            async with open_websocket_client(f"{ws_url}/stream?streams={STREAM}") as ws:
                await ws.send_message('{"method":"LIST_SUBSCRIPTIONS","id":1}')
                assert orjson.loads(await ws.get_message())["id"] == 1  # before any frame
                process.send_signal(signal.SIGUSR1)
                assert await trio.to_thread.run_sync(process.stdout.readline) == "replay resumed\n"
                events = await read_events(ws, 8)
            assert [e.open_time_ms // 1000 for e in events if e.closed] == [
                DAY + 1438 * 60,
                DAY + 1439 * 60,
            ]
        finally:
            code = await exit_code(process, signal.SIGTERM)
    assert code == 0


@pytest.mark.e2e
async def test_cli_refuses_bad_input_with_exit_code_2(day_csv: Path) -> None:
    for args in (["missing.csv"], [str(day_csv), "--speed", "fast"], []):
        with run_cli(*args) as process:
            _, err = await trio.to_thread.run_sync(process.communicate, None, 20)
        assert process.returncode == 2, (args, err)
        assert err.startswith("tradecanvas replay: ")


# a REST client that asks for this many 1,440-bar answers (~200 KB each) and reads none:
# more than its receive buffer and the replay's send buffer (4 MB at most) can hold, so the
# replay's writer waits on it for as long as it lives
UNREAD_ANSWERS = 40


async def _reads_until_closed(url: str, task_status: trio.TaskStatus[None]) -> None:
    async with open_websocket_client(url) as ws:
        await ws.get_message()
        task_status.started()
        with contextlib.suppress(trio_websocket.ConnectionClosed):
            while True:
                await ws.get_message()


@pytest.mark.e2e
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_the_real_cli_exits_0_on_a_signal_with_a_rest_client_that_stopped_reading(
    day_csv: Path, signum: signal.Signals
) -> None:
    """Hypercorn writes in a shielded scope: a REST client that stops reading used to hold
    the replay's exit for as long as that client lived (tools/replay/server.py)."""
    with run_cli("replay", str(day_csv), "--start-at", "1439", entry="tradecanvas") as process:
        try:
            assert process.stdout is not None
            line = ""
            while not line.startswith("replay ws="):
                line = await trio.to_thread.run_sync(process.stdout.readline)
                assert line, "the replay exited before it listened"
            ws_url, rest_url = (word.split("=", 1)[1] for word in line.split()[1:3])
            host, port = rest_url.removeprefix("http://").split(":")
            async with trio.open_nursery() as nursery:
                # a reading stream client, connected throughout
                await nursery.start(_reads_until_closed, f"{ws_url}/stream?streams={STREAM}")
                # and the REST client that stops reading
                with trio.socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                    await sock.connect((host, int(port)))
                    request = (
                        f"GET /fapi/v1/klines?symbol=BTCUSDT&interval=1m&limit=1500 HTTP/1.1\r\n"
                        f"Host: {host}\r\n\r\n"
                    ).encode()
                    await trio.SocketStream(sock).send_all(request * UNREAD_ANSWERS)
                    await trio.lowlevel.wait_readable(sock)  # the answers have begun
                    code = await exit_code(process, signum)
        finally:
            if process.poll() is None:
                process.kill()
    assert code == 0
