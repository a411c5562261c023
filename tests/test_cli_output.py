"""The real ``tradecanvas`` command where it cannot write or listen: a quiet end when its
output's reader has gone (``… | head``), one line for a port in use; never a traceback."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

from tests.cli_rig import cli_env
from tests.conftest import binance_data_dir
from tradecanvas.errors import ExitCode

WEEK_1M = binance_data_dir() / "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"


def test_a_reader_that_went_away_ends_the_command_quietly() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # as `head` does once it has its lines
    try:
        done = subprocess.run(
            [sys.executable, "-m", "tradecanvas", "flags"],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env=cli_env(),
            timeout=60,
            check=False,
        )
    finally:
        os.close(write_end)
    assert (done.returncode, done.stderr) == (0, b"")


def test_replay_on_a_port_in_use_says_so_in_one_line() -> None:
    """It printed 49 lines of nested exception groups."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "tradecanvas", "replay", "--port", str(port), str(WEEK_1M)],
            capture_output=True,
            text=True,
            env=cli_env(),
            timeout=60,
            check=False,
        )
    assert done.returncode == ExitCode.FAILED
    assert done.stderr.splitlines() == [
        f"tradecanvas replay: cannot listen on 127.0.0.1, ports {port} (WebSocket) and"
        f" {port + 1} (REST): [Errno 98] Address already in use"
    ]
