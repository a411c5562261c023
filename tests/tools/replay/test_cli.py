"""``tradecanvas replay``'s command line: options to ReplayConfig in-process, and the real
process (``python -m tradecanvas.tools.replay``) for signals, output and exit codes."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import trio

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


def run_cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tradecanvas.tools.replay", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


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
            process.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(process.wait, 20)
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
            process.send_signal(signal.SIGTERM)
            code = await trio.to_thread.run_sync(process.wait, 20)
    assert code == 0


@pytest.mark.e2e
async def test_cli_refuses_bad_input_with_exit_code_2(day_csv: Path) -> None:
    for args in (["missing.csv"], [str(day_csv), "--speed", "fast"], []):
        with run_cli(*args) as process:
            _, err = await trio.to_thread.run_sync(process.communicate, None, 20)
        assert process.returncode == 2, (args, err)
        assert err.startswith("tradecanvas replay: ")
