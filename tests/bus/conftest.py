"""Real Redis for the bus tests: the shared server (127.0.0.1:6379) under a key prefix of each
test's own, and private servers that a test may kill and restart."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.store_pg.conftest import pg_url as pg_url  # the roles' shared store (test_roles)
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.store.sqlite import CandleStore

SHARED_URL: Final = "redis://127.0.0.1:6379/0"
# how long a private server may take to answer its first PING
START_TIMEOUT_S: Final = 20.0


# coredis 6.9.0 creates a connection's anyio memory streams before connecting and closes them
# only once connected: every refused attempt (Redis down, in the restart tests) leaves three
# pairs for the garbage collector, which warns. Only that warning is silenced.
_COREDIS_LEAK: Final = "ignore::ResourceWarning:anyio.streams.memory"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("filterwarnings", _COREDIS_LEAK)
    # the collector may run between tests too, outside their warning filters
    warnings.filterwarnings("ignore", category=ResourceWarning, module="anyio.streams.memory")


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _missing(what: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} (CI=true: .ci/run starts Redis)")
    pytest.skip(what)


def require_redis() -> None:
    """Skip (fail with CI=true) when the shared Redis does not answer."""
    if not _answers(6379):
        _missing("no Redis answering at 127.0.0.1:6379")


@pytest.fixture(scope="session")
def redis_url() -> str:
    require_redis()
    return SHARED_URL


def new_prefix(kind: str = "tctest") -> str:
    """A bus key prefix nobody else uses on the shared Redis (``delete_prefix`` it after)."""
    return f"{kind}:{uuid.uuid4().hex}:"


async def delete_prefix(url: str, prefix: str) -> None:
    """Delete every key under ``prefix`` on the Redis at ``url``."""
    async with open_redis(url) as client:
        found = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if found:
            await client.delete(found)


@pytest.fixture
async def keys(redis_url: str) -> AsyncIterator[StreamKeys]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    prefix = new_prefix()
    yield StreamKeys(prefix)
    await delete_prefix(redis_url, prefix)


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[CandleStore]:
    """A SQLite store of the test's own (``m.sqlite3`` in tmp_path), closed afterwards."""
    opened = await CandleStore.open(tmp_path / "m.sqlite3")
    try:
        yield opened
    finally:
        await opened.aclose()


class PrivateRedis:
    """A redis-server of the test's own on a free port, nothing kept on disk: ``restart``
    loses every stream, as a Redis without persistence does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _spawn(self) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip

    async def start(self) -> None:
        assert self.process is None
        self.process = self._spawn()
        with trio.fail_after(START_TIMEOUT_S):
            # a child process gives no signal when it listens: ask until it answers
            while not await trio.to_thread.run_sync(_answers, self.port):  # noqa: ASYNC110
                await trio.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    async def restart(self) -> None:
        self.stop()
        await self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        _missing("redis-server is not installed")
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.stop()
