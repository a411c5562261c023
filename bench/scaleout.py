"""The scale-out benchmarks (issue 15, item 7): the bus path's latency and the burst served by
two edges, through the real topology: ``tradecanvas replay`` → ``serve --role ingest`` →
PostgreSQL + Redis Streams → ``serve --role edge`` → subscriber processes.

- ``scaleout_latency_p99_ms``: the latency scenario of ``bench.scenarios`` (closed candles/s
  over ``latency_series`` series, ``latency_subscribers`` subscribers on 3 series each, at
  ``latency_key_load``) with the subscribers on one edge; close frame arrival at the
  replay-side observer → subscriber, p99 (p50 recorded). The single process (``serve``,
  role ``all``, SQLite) runs the same replay in alternate rounds: its figures are the
  baseline of the same run (``raw.single_process_*``, ``raw.added_p99_ms``).
- ``scaleout_burst_ratio_vs_naive_relay``: the burst scenario (``burst_symbols`` close at
  once, ``burst_subscribers`` × ``burst_series_per_subscriber``), the subscribers split
  between two edges (one client process each); the naive relay's last-delivery time ÷ ours,
  in alternate rounds.

Each round has a PostgreSQL database (a unique name, dropped afterwards) and a Redis key
prefix (deleted afterwards) of its own. PostgreSQL (``TEST_POSTGRES_URL``) and Redis
(``TEST_REDIS_URL``) must answer: outside CI the benchmark is skipped with the reason, with
``CI=true`` it fails. See docs/benchmarks.md ("Scale-out").
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Final

import httpx
import trio

from bench.common import Figure, median
from bench.observer import Observer
from bench.procs import (
    START_TIMEOUT_S,
    Child,
    child_env,
    children,
    resume_replay,
    start_clients,
    start_replay,
)
from bench.rounds import (
    ROUND_TIMEOUT_S,
    Market,
    RoundData,
    _start_py_spy,
    _stop_py_spy,
    run_round,
    spread_subscriptions,
)
from bench.scenarios import _burst_boundaries, _latencies, _observed, _percentile
from bench.sizes import FULL, SMOKE, Sizes
from tradecanvas.bus.redis_io import open_redis
from tradecanvas.store.open import open_store
from tradecanvas.tools import services

ADMIN_URL: Final = os.environ.get(
    "TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL: Final = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
READY: Final = r"tradecanvas ready ws=(\S+) http=(\S+)"


def services_missing() -> str | None:
    """Why PostgreSQL or Redis cannot be used (None: both answer)."""
    return services.services_missing(ADMIN_URL, REDIS_URL)


async def _delete_keys(prefix: str) -> None:
    async with open_redis(REDIS_URL) as client:
        found = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if found:
            await client.delete(found)


async def _start_node(
    kids: list[Child], work: Path, name: str, role: str, env: dict[str, str]
) -> tuple[str, str]:
    """``serve --role`` ready and /readyz 200 (ingest: upstream and Redis; edge: the feed)."""
    args = [sys.executable, "-m", "tradecanvas", "serve"]
    child = Child(name, args, work / f"{name}.log", {**env, "TRADE_CANVAS_ROLE": role})
    kids.append(child)
    match = await child.wait_line(READY)
    ws_url, http_url = match.group(1), match.group(2)
    async with httpx.AsyncClient() as client:
        with trio.fail_after(START_TIMEOUT_S):
            while (await client.get(f"{http_url}/readyz")).status_code != 200:
                await trio.sleep(0.02)  # a child's readiness: polled, outside every clock
    return ws_url, http_url


def split_clients(clients: list[list[str]], edges: int) -> list[list[list[str]]]:
    """Client i goes to edge i mod ``edges``: each edge gets every edges-th client."""
    return [clients[i::edges] for i in range(edges)]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def run_scaleout_round(
    market: Market,
    clients: list[list[str]],
    *,
    edges: int,
    speed: str,
    observe: Sequence[str],
    profile: Path | None = None,
    cpu: dict[str, float] | None = None,
) -> RoundData:
    """The replay through one ingest and ``edges`` edges; the clients split between the edges
    (client i on edge i mod ``edges``), one client process per edge. ``profile``: py-spy on
    the ingest node and each edge while the replay runs, their raw collapsed stacks written
    to ``<profile>.ingest.raw`` and ``<profile>.edge-<i>.raw`` (py-spy's output beside them,
    ``.log``). ``cpu``: filled with the CPU seconds the ingest node and each edge spent from
    the replay's start to the subscribers' end (``ingest``, ``edge-<i>``)."""
    with (
        tempfile.TemporaryDirectory(prefix="bench-scaleout-") as d,
        services.fresh_database(ADMIN_URL, "tc_bench_") as (_, db),
    ):
        work = Path(d)
        prefix = f"tcbench-{uuid.uuid4().hex[:16]}"
        try:
            async with children() as kids:
                replay, replay_ws, replay_rest = await start_replay(
                    kids, work, market.files, speed=speed, forming_per_bar=0
                )
                env = child_env(
                    TRADE_CANVAS_DATABASE_URL=db,
                    TRADE_CANVAS_REDIS_URL=REDIS_URL,
                    TRADE_CANVAS_BUS_PREFIX=prefix,
                    TRADE_CANVAS_SERIES=",".join(market.series),
                    TRADE_CANVAS_WS_PORT="0",
                    TRADE_CANVAS_HTTP_PORT="0",
                    TRADE_CANVAS_BINANCE_FUTURES_WS_URL=replay_ws,
                    TRADE_CANVAS_BINANCE_FUTURES_REST_URL=replay_rest,
                    TRADE_CANVAS_INITIAL_BACKFILL_CANDLES="0",
                    TRADE_CANVAS_LOG_LEVEL="INFO",
                )
                # migrated here, so that the nodes can start together (each would migrate)
                await (await open_store(db)).aclose()
                urls: list[str] = [""] * edges

                async def edge(i: int) -> None:
                    urls[i] = (await _start_node(kids, work, f"edge-{i}", "edge", env))[0]

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_start_node, kids, work, "ingest", "ingest", env)
                    for i in range(edges):
                        nursery.start_soon(edge, i)
                observer = Observer()
                async with trio.open_nursery() as nursery:
                    if observe:
                        await nursery.start(observer.run, replay_ws, list(observe))
                    subscribers = []
                    for i, (url, share) in enumerate(
                        zip(urls, split_clients(clients, edges), strict=True)
                    ):
                        plan = work / f"plan-{i}.json"
                        plan.write_text(
                            json.dumps(
                                {
                                    "url": url,
                                    "clients": share,
                                    "since": market.bar_times[0] - 60,
                                    "last_time": market.bar_times[-1],
                                }
                            )
                        )
                        subscribers.append(await start_clients(kids, work, f"clients-{i}", plan))
                    spies = (
                        [
                            _start_py_spy(
                                kid.pid, profile.with_name(f"{profile.name}.{kid.name}.raw")
                            )
                            for kid in kids
                            if kid.name == "ingest" or kid.name.startswith("edge-")
                        ]
                        if profile
                        else []
                    )
                    nodes = [k for k in kids if k.name == "ingest" or k.name.startswith("edge-")]
                    before = {kid.name: cpu_seconds(kid.pid) for kid in nodes}
                    resumed_at = time.time()
                    await resume_replay(replay)
                    for child in subscribers:
                        await child.wait_exit(ROUND_TIMEOUT_S)
                    if cpu is not None:
                        cpu.update({k.name: cpu_seconds(k.pid) - before[k.name] for k in nodes})
                    for spy in spies:
                        _stop_py_spy(spy)
                    nursery.cancel_scope.cancel()
                results = [
                    json.loads((work / f"clients-{i}.json").read_text()) for i in range(edges)
                ]
                async with trio.open_nursery() as nursery:  # all at once, not one by one
                    for kid in kids:
                        nursery.start_soon(kid.stop)
        finally:
            await _delete_keys(prefix)
    return RoundData(
        resumed_at,
        observer.closes,
        sorted((float(t), str(s), int(c)) for r in results for t, s, c in r["deliveries"]),
        [e for r in results for e in r["errors"]],
        sum(int(r["error_count"]) for r in results),
        sum(int(r["messages"]) for r in results),
        None,
    )


def bench_scaleout(sizes: Sizes, rounds: int | None) -> list[Figure]:
    problem = services_missing()
    if problem is not None:
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"scaleout: {problem} (CI=true: a missing service is a failure)")
        sys.stdout.write(f"SKIP scaleout: {problem} (with CI=true this is a failure)\n")
        return []
    return [_latency(sizes, rounds), _burst(sizes, rounds)]


def _latency(
    sizes: Sizes,
    rounds: int | None,
    *,
    with_single: bool = True,
    profile: Path | None = None,
) -> Figure:
    """``with_single``: the single process's alternate rounds too (the baseline); ``profile``:
    py-spy on the ingest node and the edge of each scale-out round
    (``<profile>.<round>.ingest.raw``, ``<profile>.<round>.edge-0.raw``)."""
    rounds = rounds or sizes.latency_rounds
    load, series = sizes.latency_key_load, sizes.latency_series
    bars = 3 + max(5, round(sizes.latency_seconds * load / series))
    per: dict[str, dict[str, list[float]]] = {
        s: {"p50": [], "p99": [], "load": []} for s in ("single", "scaleout")
    }
    rounds_cpu: list[dict[str, float]] = []
    # the replay sends each minute's closes on a schedule, 60/speed s apart (the time it
    # spends sending does not add up), so the speed is the load's
    speed = f"{load * 60 / series:g}"
    with tempfile.TemporaryDirectory(prefix="bench-market-") as d:
        market = Market.write(Path(d), series, bars)
        clients = spread_subscriptions(market.series, sizes.latency_subscribers, 3)
        observe = _observed(market)
        # the smoke run proves the harness: the single process's rounds are the latency
        # benchmark's own, covered there
        sides = ["scaleout"] if sizes is SMOKE or not with_single else list(per)
        for round_ in range(rounds):
            for side in sides:
                cpu: dict[str, float] = {}
                go = _side_round(
                    "daemon" if side == "single" else None, market, clients, edges=1,
                    speed=speed, observe=observe, profile=profile, round_=round_, cpu=cpu,
                )  # fmt: skip
                data = trio.run(go)
                if side == "scaleout":
                    rounds_cpu.append({k: round(v, 2) for k, v in sorted(cpu.items())})
                lat, achieved = _latencies(data, market)
                per[side]["p50"].append(_percentile(lat, 0.5))
                per[side]["p99"].append(_percentile(lat, 0.99))
                per[side]["load"].append(achieved)
    ours, single = per["scaleout"], per["single"]
    return Figure(
        "scaleout_latency_p99_ms",
        median(ours["p99"]),
        "max",
        10.0,
        f"close frame sent → subscriber on an edge, p99, {load} closed candles/s over {series}"
        f" series, replay → ingest → PostgreSQL + Redis Streams → edge → "
        f"{sizes.latency_subscribers} subscribers (3 series each)",
        {
            "p50_ms": median(ours["p50"]),
            "rounds_p99_ms": ours["p99"],
            "rounds_p50_ms": ours["p50"],
            "rounds_achieved_load": ours["load"],
            "rounds_cpu_s": rounds_cpu,
            **_baseline(ours, single),
            "rounds": rounds,
        },
    )


def _side_round(
    baseline: str | None,
    market: Market,
    clients: list[list[str]],
    *,
    edges: int,
    speed: str,
    observe: Sequence[str],
    profile: Path | None,
    round_: int,
    cpu: dict[str, float] | None = None,
) -> Callable[[], Awaitable[RoundData]]:
    """One round of a side, for ``trio.run``: ``baseline`` (``"daemon"``, ``"naive"``) as
    :func:`run_round` runs it, or (None) the split topology with ``edges`` edges, py-spy on
    its nodes when ``profile`` (``<profile>.<round_>.…``), its nodes' CPU into ``cpu``."""
    if baseline is not None:
        return functools.partial(run_round, baseline, market, clients, speed=speed, observe=observe)
    return functools.partial(
        run_scaleout_round,
        market,
        clients,
        edges=edges,
        speed=speed,
        observe=observe,
        profile=None if profile is None else profile.with_suffix(f".{round_}"),
        cpu=cpu,
    )


def _baseline(ours: dict[str, list[float]], single: dict[str, list[float]]) -> dict[str, object]:
    """The single process's figures of the same run, and what the bus path adds to them."""
    if not single["p99"]:
        return {}
    return {
        "single_process_p50_ms": median(single["p50"]),
        "single_process_p99_ms": median(single["p99"]),
        "single_process_rounds_achieved_load": single["load"],
        "added_p50_ms": median(ours["p50"]) - median(single["p50"]),
        "added_p99_ms": median(ours["p99"]) - median(single["p99"]),
    }


def _burst(sizes: Sizes, rounds: int | None, *, profile: Path | None = None) -> Figure:
    """``profile``: py-spy on the ingest node and both edges of each scale-out round
    (``<profile>.<round>.ingest.raw``, ``<profile>.<round>.edge-<i>.raw``)."""
    rounds = rounds or sizes.burst_rounds
    expected = sizes.burst_subscribers * sizes.burst_series_per_subscriber
    per: dict[str, list[dict[str, float]]] = {"naive": [], "scaleout": []}
    errors = dict.fromkeys(per, 0)
    rounds_cpu: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="bench-market-") as d:
        bars = sizes.burst_warmup + sizes.burst_boundaries
        market = Market.write(Path(d), sizes.burst_symbols, bars)
        clients = spread_subscriptions(
            market.series, sizes.burst_subscribers, sizes.burst_series_per_subscriber
        )
        speed, observe = str(sizes.burst_speed), list(market.streams)
        for round_ in range(rounds):
            for side in per:
                cpu: dict[str, float] = {}
                go = _side_round(
                    "naive" if side == "naive" else None, market, clients, edges=2,
                    speed=speed, observe=observe, profile=profile, round_=round_, cpu=cpu,
                )  # fmt: skip
                data = trio.run(go)
                if side == "scaleout":
                    rounds_cpu.append({k: round(v, 2) for k, v in sorted(cpu.items())})
                boundaries = _burst_boundaries(data, market, sizes.burst_warmup)
                short = [b for b in boundaries if b["deliveries"] != expected]
                if short:
                    raise RuntimeError(f"{side}: boundaries short of deliveries: {short}")
                per[side].extend(boundaries)
                errors[side] += data.error_count
    ms = {s: median([b["last_delivery_ms"] for b in per[s]]) for s in per}
    return Figure(
        "scaleout_burst_ratio_vs_naive_relay",
        ms["naive"] / ms["scaleout"],
        "min",
        1.0,
        f"naive relay's last-delivery time ÷ two edges' ({sizes.burst_symbols} symbols ×"
        f" {sizes.burst_subscribers} subscribers × {sizes.burst_series_per_subscriber} series,"
        " half the subscribers on each edge; replay → ingest → PostgreSQL + Redis → edges)",
        {
            "scaleout_last_delivery_ms": ms["scaleout"],
            "naive_last_delivery_ms": ms["naive"],
            **{
                f"{s}_per_boundary_ms": [round(b["last_delivery_ms"], 1) for b in per[s]]
                for s in per
            },
            "overlapped_boundaries": {s: sum(int(b["overlapped"]) for b in per[s]) for s in per},
            "subscriber_errors": errors,
            "rounds_cpu_s": rounds_cpu,
            "boundaries_measured": len(per["scaleout"]),
            "rounds": rounds,
        },
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.scaleout [--smoke] [--rounds N] [--latency-only | --burst-only]
    [--no-single] [--profile FILE]``: the scale-out figures alone (``--profile``: py-spy on
    the ingest node and the edges of each scale-out round, raw collapsed stacks in
    ``FILE.<round>.ingest.raw`` and ``FILE.<round>.edge-<i>.raw``; the burst's rounds in
    ``FILE-burst.<round>.…``)."""
    parser = argparse.ArgumentParser(prog="python -m bench.scaleout", description=main.__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--rounds", type=int)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--latency-only", action="store_true", help="not the burst")
    only.add_argument("--burst-only", action="store_true", help="not the latency")
    parser.add_argument(
        "--no-single", action="store_true", help="no single-process baseline rounds"
    )
    parser.add_argument("--profile", type=Path, help="py-spy on the ingest node and the edges")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    problem = services_missing()
    if problem is not None:
        sys.stderr.write(f"scaleout: {problem}\n")
        return 2
    figures = []
    if not args.burst_only:
        figures.append(
            _latency(sizes, args.rounds, with_single=not args.no_single, profile=args.profile)
        )
    if not args.latency_only:
        burst_profile = None
        if args.profile is not None:
            burst_profile = args.profile.with_name(f"{args.profile.name}-burst")
        figures.append(_burst(sizes, args.rounds, profile=burst_profile))
    for figure in figures:
        sys.stdout.write(figure.line(judged=not args.smoke) + "\n")
        sys.stdout.write(f"     {json.dumps(figure.raw, default=str)[:600]}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
