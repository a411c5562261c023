"""The Redis boundary: which errors are Redis failures, a cancellation stays one, and a Redis
that refuses the URL's own settings is told from one that is not there."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import trio
from coredis.exceptions import ConnectionError

from tests.cli_rig import cli_env
from tradecanvas.bus.redis_io import describe, failure_or_raise, redis_failure, refused_settings
from tradecanvas.errors import ExitCode


def test_redis_failures_are_found_inside_groups() -> None:
    lost = ConnectionError("Connection lost")
    assert redis_failure(lost) is lost
    assert redis_failure(ExceptionGroup("g", [ExceptionGroup("h", [lost])])) is lost
    assert redis_failure(OSError("refused")) is not None
    assert redis_failure(ValueError("a bug")) is None
    assert describe(lost) == "ConnectionError: Connection lost"


def test_anything_else_is_raised_again() -> None:
    bug = ValueError("a bug")
    with pytest.raises(ValueError, match="a bug"):
        failure_or_raise(bug)
    lost = ConnectionError("x")
    assert failure_or_raise(lost) is lost


async def test_a_cancellation_with_a_failed_clean_up_stays_a_cancellation() -> None:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as cancelled:
            group = BaseExceptionGroup("clean-up", [cancelled, ConnectionError("closed")])
            with pytest.raises(BaseExceptionGroup) as raised:
                failure_or_raise(group)
            assert raised.value.split(trio.Cancelled)[1] is None
            raise
    assert scope.cancelled_caught


async def test_a_redis_refusing_the_urls_settings_says_why(redis_url: str) -> None:
    server = redis_url.rsplit("/", 1)[0]
    assert await refused_settings(redis_url) is None
    # a database index this server lacks (16 by default), a user it does not have
    assert await refused_settings(f"{server}/99") == "DB index is out of range"
    bad_user = redis_url.replace("redis://", "redis://nobody:wrong@")
    refusal = await refused_settings(bad_user)
    assert refusal is not None and "username-password" in refusal, refusal


async def test_a_redis_not_answering_is_not_a_refusal() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: the connection is refused
        assert await refused_settings(f"redis://127.0.0.1:{port}/0") is None


def test_a_redis_refusing_its_database_index_stops_an_edge_with_exit_2(
    tmp_path: Path, redis_url: str
) -> None:
    db = tmp_path / "market.sqlite3"
    url = redis_url.rsplit("/", 1)[0] + "/99"
    proc = subprocess.run(
        [sys.executable, "-m", "tradecanvas", "serve", "--role", "edge"],
        env=cli_env(TRADE_CANVAS_DB_PATH=str(db), TRADE_CANVAS_REDIS_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # a flag error (systemd does not restart it), said once, before the store is opened
    assert proc.returncode == ExitCode.USAGE
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [
        f"CRITICAL tradecanvas.daemon: cannot start: TRADE_CANVAS_REDIS_URL: the Redis at {url}"
        " refuses it: DB index is out of range"
    ], proc.stderr
    assert not db.exists()
