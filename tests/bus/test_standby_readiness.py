"""An ingest node's /readyz says whether Redis answers its lease (soak finding: the hot
standby answered 200 while Redis was down, though it could neither take the lease over nor
publish). Real ``serve --role ingest`` subprocesses, a private ``redis-server`` stopped and
started again, the test's own PostgreSQL database, ``tradecanvas replay`` as Binance (paused:
a quiet market, so the holder's publisher has nothing to send either)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import pytest

from tests.bus.cluster import Node, paused_replay, roles_env, stop, wait_dependency, wait_ready
from tests.bus.conftest import PrivateRedis
from tests.bus.roles_rig import metric, metrics_text, readyz, source
from tests.cli_rig import run_cli, wait_for_line

LEASE_MS: Final = 1_000
CHECK: Final = "bus_lease_connected"


@pytest.mark.e2e
async def test_both_ingest_nodes_are_not_ready_while_redis_does_not_answer_the_lease(
    tmp_path: Path, private_redis: PrivateRedis, pg_url: str
) -> None:
    await private_redis.start()
    data = source(tmp_path)
    async with paused_replay(tmp_path, data) as replay:
        env = roles_env(
            replay,
            redis_url=private_redis.url,
            prefix="tcstandby",
            database_url=pg_url,
            TRADE_CANVAS_INGEST_LEASE_MS=str(LEASE_MS),
        )
        logs = [tmp_path / f"ingest-{i}.log" for i in (1, 2)]
        with run_cli(["serve", "--role", "ingest"], env, logs[0]) as first:
            found = await wait_for_line(logs[0], r"ready ws=(\S+) http=(\S+)", first)
            holder = Node("holder", first, logs[0], found.group(1), found.group(2))
            await wait_for_line(logs[0], r"took the lease over", first)
            with run_cli(["serve", "--role", "ingest"], env, logs[1]) as second:
                found = await wait_for_line(logs[1], r"ready ws=(\S+) http=(\S+)", second)
                standby = Node("standby", second, logs[1], found.group(1), found.group(2))
                await wait_for_line(logs[1], r"this node stands by", second)
                for node in (holder, standby):
                    status, doc = await readyz(node.http)
                    assert status == 200 and doc["checks"][CHECK] is True, (node.name, doc)

                private_redis.stop()
                for node in (standby, holder):
                    # the lease's exchange with Redis failed (the metric says so) ...
                    await wait_dependency(node, "redis_lease", 0.0)
                    # ... and /readyz names it: the node can neither take over nor publish
                    status, doc = await readyz(node.http)
                    assert status == 503, (node.name, doc)
                    assert doc["checks"][CHECK] is False, (node.name, doc)
                text = await metrics_text(standby.http)
                assert metric(text, "tradecanvas_ingest_leader") == 0.0

                await private_redis.start()
                for node in (standby, holder):
                    await wait_ready(node, CHECK, True)
                    await wait_dependency(node, "redis_lease", 1.0)
                status, doc = await readyz(standby.http)
                assert status == 200, doc
                await stop(standby, holder)
