"""Issue 17 item 1: ``kill -9`` of ``tradecanvas serve`` at seeded moments, restarted each
time, while ``tradecanvas replay`` streams 4 symbols of closed 1m candles at full speed.

The kill moments are seeded thresholds of closed candles a subscriber has been sent (so the
daemon is killed with batches in flight, mid-backfill, mid-catch-up). After each restart the
subscriber resumes with ``since`` (its newest candle) and ``events_after`` (its newest
event_id): in every session it must get exactly the candles after its cursor, in order, none
twice; across the run every candle once and equal to the source, every stored event once. At
the end the store holds every candle exactly once, equal to the source (exact decimal text),
and ``PRAGMA integrity_check`` is ok.

Sizes: ``make test`` 4 × 2,500 candles and 20 kills (about 75 s on 2 shared cores);
``make soak`` 4 × 2,500 and 200 kills (TRADECANVAS_SOAK=1).
"""

from __future__ import annotations

import os
import random
import signal
from pathlib import Path

import pytest
import trio

from tests.cli_rig import children
from tests.reliability.record import ReliabilityRecord, report, sized
from tests.reliability.rig import (
    START,
    Subscriber,
    check_resumed,
    csv_files,
    integrity,
    market_files,
    serve_env,
    start_replay,
    start_serve,
    stored_differences,
    stored_event_ids,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SEED = 1701


async def test_kill_minus_9_loop_loses_and_doubles_nothing(tmp_path: Path) -> None:
    count = sized(2500, 2500)
    kills = sized(20, 200)
    source = market_files(tmp_path, SEED, count)
    series = sorted(source)
    total = len(series) * count
    rng = random.Random(SEED)
    # kill when the subscriber has been sent this many candles (distinct, increasing)
    thresholds = sorted(rng.sample(range(1, total - 1), kills))
    db = tmp_path / "market.sqlite3"
    log = tmp_path / "serve.log"
    sub = Subscriber(series, START)
    killed = 0
    with children() as kids:
        _, ws, rest = await start_replay(kids, tmp_path, csv_files(tmp_path))
        env = serve_env(db, ws, rest, series)
        for round_ in range(kills + 1):
            proc, url, _ = await start_serve(kids, log, env)
            async with trio.open_nursery() as nursery:
                await nursery.start(sub.session, url)
                if round_ < kills:
                    goal = thresholds[round_]

                    def reached(goal: int = goal) -> bool:
                        return sub.total() >= goal or sub.close_code is not None

                    await sub.wait_until(reached)
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    killed += 1
                else:
                    await sub.wait_until(lambda: sub.total() >= total)
                    proc.send_signal(signal.SIGTERM)
                    proc.wait()
                await sub.wait_until(lambda: sub.close_code is not None)
                nursery.cancel_scope.cancel()

    lost, dup = check_resumed(sub, source)
    stored = 0
    for sid in series:
        n, missing, different = stored_differences(db, sid, source[sid])
        stored += n
        assert (n, missing, different) == (count, 0, 0), sid
        # every stored event was delivered once, across the sessions, in order
        assert sub.events[sid] == stored_event_ids(db, sid), sid
    assert integrity(db) == "ok"
    assert killed == kills
    report(
        ReliabilityRecord(
            test="kill_loop",
            seed=SEED,
            faults=killed,
            attempted=total,
            stored=stored,
            delivered=sum(len(t) for t in sub.times.values()),
            lost=lost,
            duplicated=dup,
        )
    )
