"""The daemon on its own: ingest throughput and the memory of idle subscribers.

- ingest: ``tradecanvas replay --speed max`` (forming frames included, the replay's default
  3 a bar) → ``tradecanvas serve`` → committed: frames sent ÷ the time from the replay's
  start until the daemon's store holds every base series' last bar, read from the store
  file by the driver itself (a read-only connection, polled every 5 ms: the figure is a
  little low, by at most one poll; polling ``/api/market/series`` instead cost the daemon
  under test 8 % of its CPU).
- rss: the daemon's VmRSS with ``rss_base`` idle subscribers, then with ``rss_subscribers``
  more (a second client process), each subscribed to one series of a paused replay, caught
  up (pong received), and idle: the growth per subscriber. Starting from a base of
  subscribers leaves out the one-time costs of the first connections.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Final

import trio

from bench.common import Figure, median
from bench.procs import children, resume_replay, rss_kib, start_clients, start_replay, start_serve
from bench.rounds import Market
from bench.sizes import Sizes

POLL_S: Final = 0.02
# how often the ingest benchmark looks at the store for the last bars
STORE_POLL_S: Final = 0.005
# the daemon settles (GC, lazily built structures) before RSS is read
SETTLE_S: Final = 1.0


async def _ingest_round(market: Market) -> tuple[float, int]:
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as d:
        work = Path(d)
        async with children() as kids:
            replay, ws, rest = await start_replay(
                kids, work, market.files, speed="max", forming_per_bar=3
            )
            await start_serve(kids, work, market.series, ws, rest)
            last = market.bar_times[-1]
            with _store_reader(work / "market.sqlite3") as heads:
                start = time.time()
                await resume_replay(replay)
                while not heads(market.series, last):
                    await trio.sleep(STORE_POLL_S)
                seconds = time.time() - start
            match = await replay.wait_line(r"replay finished bars=\d+ frames=(\d+)")
            return seconds, int(match.group(1))


@contextlib.contextmanager
def _store_reader(path: Path) -> Iterator[Callable[[Sequence[str], int], bool]]:
    """A read-only connection to the daemon's store file; the function it yields says
    whether every one of ``series`` has its bar at ``last`` stored (committed)."""
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)

    def all_at(series: Sequence[str], last: int) -> bool:
        marks = ", ".join("?" * len(series))
        rows = conn.execute(
            f"SELECT COUNT(*) FROM candles WHERE candle_time = ? AND series_id IN ({marks})",  # noqa: S608
            (last, *series),
        ).fetchone()
        return int(rows[0]) == len(series)

    try:
        yield all_at
    finally:
        conn.close()


def bench_ingest(sizes: Sizes, rounds: int | None) -> Figure:
    rounds = rounds or sizes.ingest_rounds
    with tempfile.TemporaryDirectory(prefix="bench-market-") as d:
        market = Market.write(Path(d), sizes.ingest_series, sizes.ingest_bars)
        results = [trio.run(_ingest_round, market) for _ in range(rounds)]
    rates = [frames / seconds for seconds, frames in results]
    return Figure(
        "ingest_frames_per_s",
        median(rates),
        "min",
        20_000,
        "tradecanvas replay --speed max → serve → committed, frames/s (forming and closed)",
        {
            "series": sizes.ingest_series,
            "bars": sizes.ingest_bars,
            "frames": results[0][1],
            "seconds": median([s for s, _ in results]),
            "rounds_frames_per_s": rates,
        },
    )


async def _rss_round(market: Market, sizes: Sizes) -> tuple[int, int]:
    with tempfile.TemporaryDirectory(prefix="bench-rss-") as d:
        work = Path(d)
        async with children() as kids:
            _, ws, rest = await start_replay(kids, work, market.files, speed="1", forming_per_bar=0)
            serve, url, _ = await start_serve(kids, work, market.series, ws, rest)
            sid = market.series[0]
            for name, count in (("base", sizes.rss_base), ("more", sizes.rss_subscribers)):
                plan = work / f"{name}.plan.json"
                plan.write_text(
                    json.dumps(
                        {"url": url, "clients": [[sid]] * count, "since": None, "last_time": None}
                    )
                )
                await start_clients(kids, work, name, plan)
                await trio.sleep(SETTLE_S)
                if name == "base":
                    before = rss_kib(serve.pid)
            after = rss_kib(serve.pid)
            return before, after


def bench_rss(sizes: Sizes, rounds: int | None) -> Figure:
    rounds = rounds or sizes.rss_rounds
    with tempfile.TemporaryDirectory(prefix="bench-market-") as d:
        market = Market.write(Path(d), 1, 2)
        results = [trio.run(_rss_round, market, sizes) for _ in range(rounds)]
    per = [(after - before) / sizes.rss_subscribers for before, after in results]
    return Figure(
        "rss_kib_per_idle_subscriber",
        median(per),
        "max",
        50.0,
        f"daemon RSS growth per idle subscriber, {sizes.rss_subscribers} of them (above a base"
        f" of {sizes.rss_base})",
        {"rounds_rss_kib": [{"before": b, "after": a} for b, a in results], "rounds_per": per},
    )
