"""Issue 17 item 1, distributed: the kill loop of ``test_kill_loop.py`` for an ingest node
and for an edge — ``tradecanvas serve --role ingest`` and ``--role edge`` as real
subprocesses on PostgreSQL (a database of the test's own) and Redis (a key prefix of its
own), ``tradecanvas replay`` streaming 4 symbols of closed 1m candles at full speed.

- ``ingest``: the ingest node is killed with SIGKILL at seeded moments and started again
  (it takes the lease over once the dead node's has expired, and repairs from the store's
  last candle through REST). A subscriber on the edge disconnects at each kill and
  resumes after the restart with ``since``/``events_after``; a second one stays connected
  to the edge throughout.
- ``edge``: the edge is killed at seeded moments and started again; the subscriber
  resumes on the new edge with its cursors.

The moments are seeded thresholds of closed candles the resuming subscriber has been sent.
In every session it must get exactly the candles after its cursor, in order, none twice;
across the run every candle once and equal to the source and every stored event once. At
the end the store holds every candle exactly once, equal to the source.

Sizes: ``make test`` 4 × 400 candles and 3 kills each; ``make soak`` 4 × 2,500 and 200.
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import trio

from tests.bus.cluster import Node
from tests.cli_rig import children
from tests.reliability.distributed import LEASE_MS, check_pg_stored, role_env, stop_nodes
from tests.reliability.distributed import start_role as start
from tests.reliability.record import ReliabilityRecord, report, sized
from tests.reliability.rig import (
    START,
    Subscriber,
    check_resumed,
    csv_files,
    market_files,
    start_replay,
)
from tradecanvas.bus.ids import StreamKeys

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 1711


def killed(node: Node) -> None:
    os.killpg(node.proc.pid, signal.SIGKILL)
    node.proc.wait()


@pytest.mark.parametrize("role", ["ingest", "edge"])
async def test_distributed_kill_loop_loses_and_doubles_nothing(
    tmp_path: Path, role: str, redis_url: str, keys: StreamKeys, pg_url: str
) -> None:
    count = sized(400, 2500)
    kills = sized(3, 200)
    seed = SEED + (role == "edge")
    source = market_files(tmp_path, seed, count)
    series = sorted(source)
    total = len(series) * count
    rng = random.Random(seed)
    thresholds = sorted(rng.sample(range(1, total - 1), kills))
    sub = Subscriber(series, START)
    witness = Subscriber(series, START)  # role ingest: connected to the edge throughout
    with children() as kids:
        _, ws, rest = await start_replay(kids, tmp_path, csv_files(tmp_path))
        env = role_env(
            tmp_path,
            ws,
            rest,
            series,
            database_url=pg_url,
            redis_url=redis_url,
            prefix=keys.prefix,
            TRADE_CANVAS_INGEST_LEASE_MS=LEASE_MS,
        )
        # one after the other: each migrates the shared store at start-up
        ingest = await start(kids, tmp_path, "ingest", env)
        edge = await start(kids, tmp_path, "edge", env)
        async with trio.open_nursery() as outer:
            if role == "ingest":
                await outer.start(witness.session, edge.ws)
            for round_ in range(kills + 1):
                if round_ and role == "ingest":
                    ingest = await start(kids, tmp_path, "ingest", env)
                elif round_:
                    edge = await start(kids, tmp_path, "edge", env)
                async with trio.open_nursery() as nursery:
                    await nursery.start(sub.session, edge.ws)
                    if round_ == kills:
                        await sub.wait_until(lambda: sub.total() >= total)
                    else:
                        goal = thresholds[round_]
                        await sub.wait_until(lambda g=goal: sub.total() >= g)  # type: ignore[misc]
                        if role == "ingest":
                            nursery.cancel_scope.cancel()  # the subscriber leaves, then the kill
                            killed(ingest)
                        else:
                            killed(edge)
                            await sub.wait_until(lambda: sub.close_code is not None)
                    nursery.cancel_scope.cancel()
            if role == "ingest":
                await witness.wait_until(lambda: witness.total() >= total)
            outer.cancel_scope.cancel()
        await stop_nodes(edge, ingest)

    lost, dup = check_resumed(sub, source)
    assert len(sub.sessions) == kills + 1
    if role == "ingest":
        assert check_resumed(witness, source) == (0, 0)
        assert len(witness.sessions) == 1
    stored = check_pg_stored(pg_url, sub, source)
    report(
        ReliabilityRecord(
            test=f"distributed_kill_loop[{role}]",
            seed=seed,
            faults=kills,
            attempted=total,
            stored=stored,
            delivered=sub.total(),
            lost=lost,
            duplicated=dup,
        )
    )
