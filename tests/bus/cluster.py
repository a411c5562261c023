"""A running distributed topology for the fault tests: ``tradecanvas replay`` as Binance,
``serve --role ingest`` and edges, each a real subprocess on real Redis and PostgreSQL."""

from __future__ import annotations

import contextlib
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import attrs
import trio

from tests.bus.roles_rig import (
    HISTORY_BARS,
    READY,
    Source,
    metric,
    metrics_text,
    readyz,
    replay_urls,
    wait_for,
)
from tests.cli_rig import cli_env, run_cli, wait_for_line

# a bar every 50 ms: the streamed part lasts about 12 s, so a fault lands mid-run
SPEED: Final = "1200"


@attrs.frozen
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    ws: str
    http: str


@attrs.define
class Cluster:
    replay: subprocess.Popen[bytes]
    env: dict[str, str]
    ingest: Node
    edges: list[Node]

    def stream(self) -> None:
        self.replay.send_signal(signal.SIGUSR1)


@attrs.frozen
class Replay:
    proc: subprocess.Popen[bytes]
    ws_url: str
    rest_url: str


@contextlib.asynccontextmanager
async def paused_replay(tmp_path: Path, data: Source, *args: str) -> AsyncIterator[Replay]:
    """``tradecanvas replay`` of ``data`` at :data:`SPEED`, paused (SIGUSR1 starts the
    stream) with :data:`HISTORY_BARS` bars of REST history; killed on the way out."""
    log = tmp_path / "replay.log"
    with run_cli(
        ["replay", str(data.csv), "--port", "0", "--speed", SPEED, "--paused",
         "--start-at", str(HISTORY_BARS), *args],
        cli_env(),
        log,
    ) as proc:  # fmt: skip
        ws_url, rest_url = await replay_urls(log, proc)
        yield Replay(proc, ws_url, rest_url)


def roles_env(
    replay: Replay, *, redis_url: str, prefix: str, database_url: str, **extra: str
) -> dict[str, str]:
    """The environment of every role on ``replay``, Redis (key ``prefix``) and PostgreSQL."""
    return cli_env(
        TRADE_CANVAS_REDIS_URL=redis_url,
        TRADE_CANVAS_BUS_PREFIX=prefix,
        TRADE_CANVAS_DATABASE_URL=database_url,
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL=replay.ws_url,
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL=replay.rest_url,
        TRADE_CANVAS_INITIAL_BACKFILL_CANDLES=str(HISTORY_BARS),
        TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
        TRADE_CANVAS_ENABLE_INGEST_WS_PIPELINE_PUBLISH="1",
        **extra,
    )


async def _node(
    stack: contextlib.ExitStack, tmp_path: Path, name: str, role: str, env: dict[str, str]
) -> Node:
    log = tmp_path / f"{name}.log"
    proc = stack.enter_context(run_cli(["serve", "--role", role], env, log))
    found = await wait_for_line(log, READY, proc)
    return Node(name, proc, log, found.group(1), found.group(2))


@contextlib.asynccontextmanager
async def cluster(
    tmp_path: Path,
    data: Source,
    *,
    redis_url: str,
    prefix: str,
    database_url: str,
    edges: int = 1,
    replay_args: tuple[str, ...] = (),
    **extra: str,
) -> AsyncIterator[Cluster]:
    """Replay (paused: :meth:`Cluster.stream` starts it), one ingest, ``edges`` edges; all
    stopped (SIGKILL) on the way out."""
    async with paused_replay(tmp_path, data, *replay_args) as replay:
        env = roles_env(
            replay, redis_url=redis_url, prefix=prefix, database_url=database_url, **extra
        )
        with contextlib.ExitStack() as stack:
            # one after the other: each migrates the shared store at start-up
            ingest = await _node(stack, tmp_path, "ingest", "ingest", env)
            nodes = [await _node(stack, tmp_path, f"edge-{i}", "edge", env) for i in range(edges)]
            yield Cluster(replay.proc, env, ingest, nodes)


async def stop(*nodes: Node) -> None:
    """SIGTERM; each must exit 0 (a clean drain)."""
    for node in nodes:
        node.proc.send_signal(signal.SIGTERM)
        assert await trio.to_thread.run_sync(node.proc.wait) == 0, node.log.read_text()


async def wait_ready(node: Node, check: str, value: bool) -> None:
    """Until /readyz shows ``check`` = ``value`` (and answers 503 when it is False)."""

    async def shows() -> bool:
        status, doc = await readyz(node.http)
        checks = doc["checks"]
        return checks.get(check) is value and (value or status == 503)

    await wait_for(shows, f"{node.name} /readyz {check}={value}")


async def wait_dependency(node: Node, dependency: str, up: float) -> None:
    name = f'tradecanvas_dependency_up{{dependency="{dependency}"}}'

    async def shows() -> bool:
        return metric(await metrics_text(node.http), name) == up

    await wait_for(shows, f"{node.name} {name} {up}")


async def pause(seconds: float) -> None:
    """Let a fault last a while (a real outage has a duration; nothing waits on it)."""
    await trio.sleep(seconds)
