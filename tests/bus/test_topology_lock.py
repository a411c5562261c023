"""The single process and the split topology on one PostgreSQL database refuse each other,
whichever starts second (``store/lock_holder.py``): the real ``tradecanvas serve`` in
subprocesses, real PostgreSQL (a database of the test's own) and the shared Redis under a
key prefix of the test's own. An operator who moved to the split topology and forgot to
stop ``tradecanvas.service`` had both ingest every event, each with its own Binance
connections, and the ingest logged ``took the lease over`` beside the running single
process. Two ingest nodes still run together: the lease picks the writer."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Final

import pytest
import trio

from tests.bus.roles_rig import READY
from tests.cli_rig import cli_env, exit_code_within, run_cli, wait_for_line
from tests.store_pg.test_serve_lock import wait_until_free
from tradecanvas.bus.ids import StreamKeys
from tradecanvas.errors import ExitCode

# no Binance here: an unreachable loopback port keeps the ingest reconnecting
NO_UPSTREAM: Final = {
    "TRADE_CANVAS_BINANCE_FUTURES_WS_URL": "ws://127.0.0.1:9/market",
    "TRADE_CANVAS_BINANCE_FUTURES_REST_URL": "http://127.0.0.1:9",
}
REFUSED: Final = "cannot start (exit code 3): candle store "
TOOK_OVER: Final = r"ingest lease: node \S+ took the lease over"
# bounds each wait: a start-up, or a refusal (a live holder is refused at once)
WITHIN_S: Final = 60


def _env(tmp_path: Path, pg_url: str, redis_url: str, keys: StreamKeys) -> dict[str, str]:
    return cli_env(
        TRADE_CANVAS_DB_PATH=str(tmp_path / "unused.sqlite3"),
        TRADE_CANVAS_DATABASE_URL=pg_url,
        TRADE_CANVAS_REDIS_URL=redis_url,
        TRADE_CANVAS_BUS_PREFIX=keys.prefix,
        **NO_UPSTREAM,
    )


async def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    assert await exit_code_within(proc, 30) == ExitCode.OK


@pytest.mark.e2e
async def test_role_ingest_is_refused_beside_a_running_single_process(
    tmp_path: Path, pg_url: str, redis_url: str, keys: StreamKeys
) -> None:
    env = _env(tmp_path, pg_url, redis_url, keys)
    single_log, ingest_log = tmp_path / "single.log", tmp_path / "ingest.log"
    with run_cli(["serve"], env, single_log) as single:
        await wait_for_line(single_log, READY, single, within=WITHIN_S)
        with run_cli(["serve", "--role", "ingest"], env, ingest_log) as ingest:
            assert await exit_code_within(ingest, WITHIN_S) == ExitCode.STORE_FAILURE
        said = ingest_log.read_text()
        assert REFUSED + pg_url in said
        assert (
            f"is in use by another tradecanvas serve of role all (tradecanvas serve pid"
            f" {single.pid} on " in said
        )
        assert "stop that one first (its unit: systemctl disable --now tradecanvas)" in said
        assert "ingest lease" not in said  # refused before it asked for the lease
        assert single.poll() is None  # the single process runs on
        await _stop(single)
    await trio.to_thread.run_sync(wait_until_free, pg_url)  # its session ended on the server
    with run_cli(["serve", "--role", "ingest"], env, ingest_log) as ingest:  # now it starts
        await wait_for_line(ingest_log, TOOK_OVER, ingest, within=WITHIN_S)
        await _stop(ingest)


@pytest.mark.e2e
async def test_the_single_process_is_refused_beside_two_ingest_nodes_that_run_together(
    tmp_path: Path, pg_url: str, redis_url: str, keys: StreamKeys
) -> None:
    env = _env(tmp_path, pg_url, redis_url, keys)
    logs = {name: tmp_path / f"{name}.log" for name in ("ingest-a", "ingest-b", "single")}
    with run_cli(["serve", "--role", "ingest"], env, logs["ingest-a"]) as first:
        # one after the other: the first migrates the new database
        await wait_for_line(logs["ingest-a"], TOOK_OVER, first, within=WITHIN_S)
        with run_cli(["serve", "--role", "ingest"], env, logs["ingest-b"]) as second:
            await wait_for_line(logs["ingest-b"], READY, second, within=WITHIN_S)
            await wait_for_line(logs["ingest-b"], "this node stands by", second, within=WITHIN_S)
            with run_cli(["serve"], env, logs["single"]) as single:
                assert await exit_code_within(single, WITHIN_S) == ExitCode.STORE_FAILURE
            said = logs["single"].read_text()
            assert REFUSED + pg_url in said
            assert (
                "is in use by another tradecanvas serve of role ingest (tradecanvas serve pid"
                in said
            )
            assert "; 2 sessions hold it)" in said
            assert (
                "stop them first (their units: tradecanvas@<instance>), or run this one with"
                " --role ingest or edge" in said
            )
            assert "tradecanvas ready" not in said
            assert first.poll() is None and second.poll() is None  # both run on
            await _stop(second)
        await _stop(first)
    await trio.to_thread.run_sync(wait_until_free, pg_url)
    with run_cli(["serve"], env, logs["single"]) as single:  # the split topology is gone
        await wait_for_line(logs["single"], READY, single, within=WITHIN_S)
        await _stop(single)
