"""The process benchmarks: the minute-boundary burst, fan-out, latency, ingest, idle RSS.
Each side of a comparison runs the same replay (same files, same options) in its own round;
rounds alternate between the sides. See docs/benchmarks.md for the method of each."""

from __future__ import annotations

import functools
import tempfile
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import trio

from bench import plot
from bench.common import RESULTS, Figure, median
from bench.rounds import Market, RoundData, run_round, spread_subscriptions
from bench.sizes import Sizes

SYSTEMS: Final = ("daemon", "naive", "raw")


# --- the minute-boundary burst ----------------------------------------------------------


def round_order(r: int) -> tuple[str, ...]:
    """The systems in round ``r``: the order turns each round, so no system always runs
    right after the same one."""
    k = r % len(SYSTEMS)
    return SYSTEMS[k:] + SYSTEMS[:k]


def _burst_boundaries(data: RoundData, market: Market, warmup: int) -> list[dict[str, float]]:
    """Per measured boundary: the last close frame's arrival at the observer, the first and
    last delivery of that minute at any subscriber, and the count of deliveries."""
    by_minute: dict[int, list[float]] = defaultdict(list)
    for t, _sid, candle_time in data.deliveries:
        by_minute[candle_time].append(t)
    out = []
    for minute in market.bar_times[warmup:]:
        sent = [data.closes.get((stream, minute)) for stream in market.streams]
        got = by_minute.get(minute, [])
        if any(s is None for s in sent) or not got:
            raise RuntimeError(f"boundary {minute}: missing closes or deliveries")
        last_sent = max(s for s in sent if s is not None)
        # the next boundary's closes began before this one was delivered: not isolated
        following = [t for (_, m), t in data.closes.items() if m > minute]
        overlapped = bool(following) and max(got) > min(following)
        out.append(
            {
                "minute": minute,
                "last_delivery_ms": (max(got) - last_sent) * 1e3,
                "first_to_last_delivery_ms": (max(got) - min(got)) * 1e3,
                "from_first_close_ms": (max(got) - min(s for s in sent if s)) * 1e3,
                "close_frames_spread_ms": (last_sent - min(s for s in sent if s)) * 1e3,
                "deliveries": len(got),
                "overlapped": float(overlapped),
            }
        )
    return out


def bench_burst(sizes: Sizes, rounds: int | None, *, profile: bool) -> list[Figure]:
    rounds = rounds or sizes.burst_rounds
    with tempfile.TemporaryDirectory(prefix="bench-market-") as d:
        bars = sizes.burst_warmup + sizes.burst_boundaries
        market = Market.write(Path(d), sizes.burst_symbols, bars)
        clients = spread_subscriptions(
            market.series, sizes.burst_subscribers, sizes.burst_series_per_subscriber
        )
        expected = sizes.burst_subscribers * sizes.burst_series_per_subscriber
        per: dict[str, list[dict[str, float]]] = {s: [] for s in SYSTEMS}
        errors: dict[str, int] = dict.fromkeys(SYSTEMS, 0)
        for r in range(rounds):
            for system in round_order(r):
                spy = RESULTS / "profile-burst.raw" if profile and r == 0 else None
                data = trio.run(
                    functools.partial(
                        run_round,
                        system,
                        market,
                        clients,
                        speed=str(sizes.burst_speed),
                        observe=list(market.streams),
                        profile=spy,
                    )
                )
                boundaries = _burst_boundaries(data, market, sizes.burst_warmup)
                short = [b for b in boundaries if b["deliveries"] != expected]
                if short:
                    raise RuntimeError(f"{system}: boundaries short of deliveries: {short}")
                per[system].extend(boundaries)
                errors[system] += data.error_count
        if profile:
            plot.summarize_profile(RESULTS / "profile-burst.raw")
    ms = {s: median([b["last_delivery_ms"] for b in per[s]]) for s in SYSTEMS}
    raw: dict[str, object] = {
        "symbols": sizes.burst_symbols,
        "subscribers": sizes.burst_subscribers,
        "series_per_subscriber": sizes.burst_series_per_subscriber,
        "boundaries_measured": len(per["daemon"]),
        "rounds": rounds,
        **{f"{s}_last_delivery_ms": ms[s] for s in SYSTEMS},
        **{
            f"{s}_first_to_last_delivery_ms": median(
                [b["first_to_last_delivery_ms"] for b in per[s]]
            )
            for s in SYSTEMS
        },
        # from the first close frame instead of the last: what the replay's own sending
        # pace (close_frames_spread_ms) adds to every side alike
        **{
            f"{s}_from_first_close_ms": median([b["from_first_close_ms"] for b in per[s]])
            for s in SYSTEMS
        },
        **{
            f"{s}_per_boundary_ms": [round(b["last_delivery_ms"], 1) for b in per[s]]
            for s in SYSTEMS
        },
        "close_frames_spread_ms": median([b["close_frames_spread_ms"] for b in per["daemon"]]),
        "subscriber_errors": errors,
        # boundaries whose deliveries ran into the next boundary's closes (then the replay
        # speed is too high for the system: the figure includes a backlog)
        "overlapped_boundaries": {s: sum(int(b["overlapped"]) for b in per[s]) for s in SYSTEMS},
        "seconds_between_boundaries": 60 / sizes.burst_speed,
    }
    return [
        Figure(
            "burst_ratio_vs_naive_relay",
            ms["naive"] / ms["daemon"],
            "min",
            1.0,
            "naive relay's last-delivery time ÷ the daemon's (400 symbols × 1,000 subscribers"
            " × 3 series, through tradecanvas replay)",
            raw,
        ),
        Figure(
            "burst_ratio_vs_raw_frames",
            ms["raw"] / ms["daemon"],
            "min",
            0.9,
            "raw-frames relay's last-delivery time ÷ the daemon's (same scenario)",
            {"raw_frames_last_delivery_ms": ms["raw"], "daemon_last_delivery_ms": ms["daemon"]},
        ),
        Figure(
            "burst_last_delivery_ms_400_symbols_1000_subs",
            ms["daemon"],
            "record",
            None,
            "the daemon: last close frame sent → last delivery at any subscriber, median of"
            " the boundaries",
            {"naive_relay_ms": ms["naive"], "raw_frames_ms": ms["raw"]},
        ),
    ]


# --- fan-out -----------------------------------------------------------------------------


def _deliveries_per_s(data: RoundData, expected: int) -> float:
    if len(data.deliveries) != expected:
        raise RuntimeError(f"{len(data.deliveries)} deliveries, expected {expected}")
    return expected / (max(t for t, _, _ in data.deliveries) - data.resumed_at)


def bench_fanout(sizes: Sizes, rounds: int | None) -> Figure:
    """One series replayed at ``--speed max`` to N subscribers of it: candle deliveries per
    second from the replay's start to the last delivery, daemon vs. the naive relay (a bare
    trio-websocket server sending one message per candle to each subscriber)."""
    rounds = rounds or sizes.fanout_rounds
    raw: dict[str, object] = {}
    ratios = []
    for subs, candles in sizes.fanout:
        with tempfile.TemporaryDirectory(prefix="bench-market-") as d:
            market = Market.write(Path(d), 1, candles)
            clients = [[market.series[0]] for _ in range(subs)]
            rates: dict[str, list[float]] = {"daemon": [], "naive": []}
            for _ in range(rounds):
                for system in rates:
                    data = trio.run(
                        functools.partial(run_round, system, market, clients, speed="max")
                    )
                    rates[system].append(_deliveries_per_s(data, subs * candles))
        ours, bare = median(rates["daemon"]), median(rates["naive"])
        ratios.append(ours / bare)
        raw[f"{subs}_subscribers"] = {
            "candles": candles,
            "daemon_deliveries_per_s": ours,
            "bare_trio_websocket_deliveries_per_s": bare,
            "ratio": ours / bare,
        }
    return Figure(
        "fanout_ratio_vs_bare_trio_websocket",
        min(ratios),
        "min",
        3.0,
        "candle deliveries/s, replay --speed max → daemon → N subscribers of one series, ÷ a"
        " bare trio-websocket server sending one message per candle; the lower of the sizes",
        raw,
    )


# --- latency ------------------------------------------------------------------------------

LATENCY_WARMUP: Final = 3


# the observer follows one series in this many: each stream it follows costs the replay a
# second send of every frame, and the replay's sending is what limits the load it can make
OBSERVE_ONE_IN: Final = 10


def _observed(market: Market) -> list[str]:
    return sorted(market.streams)[::OBSERVE_ONE_IN]


def _latencies(data: RoundData, market: Market) -> tuple[list[float], float]:
    """Per delivery of a measured bar on an observed series: arrival − its close frame's
    arrival at the observer (ms); and the closed candles/s the replay actually sent over
    the measured bars (all series, estimated from the observed ones)."""
    stream_of = market.stream_of()
    first = market.bar_times[LATENCY_WARMUP]
    out = [
        (t - data.closes[(stream_of[sid], ct)]) * 1e3
        for t, sid, ct in data.deliveries
        if ct >= first and (stream_of[sid], ct) in data.closes
    ]
    minutes: dict[int, list[float]] = defaultdict(list)
    for (_, ct), v in data.closes.items():
        if ct >= first:
            minutes[ct].append(v)
    # from the first close of the first measured minute to the last close of the last
    span = max(minutes[max(minutes)]) - min(minutes[min(minutes)])
    sent = len(minutes) * len(market.streams)
    return out, sent / span if span > 0 else float("nan")


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def bench_latency(sizes: Sizes, rounds: int | None) -> list[Figure]:
    """``latency_series`` series closing together every 60/speed s, speed chosen for each
    load (closed candles/s); ``latency_subscribers`` subscribers on 3 series each; latency
    = subscriber arrival − close frame arrival at the replay-side observer."""
    rounds = rounds or sizes.latency_rounds
    points: dict[str, list[dict[str, float]]] = {"naive": [], "daemon": []}
    key_p99: list[float] = []
    key_loads: list[float] = []
    for load in sorted({*sizes.latency_loads, sizes.latency_key_load}):
        # the replay sends each minute's closes on a schedule, 60/speed s apart (the time
        # it spends sending does not add up), so the speed is the load's
        speed = load * 60 / sizes.latency_series
        bars = LATENCY_WARMUP + max(5, round(sizes.latency_seconds * load / sizes.latency_series))
        with tempfile.TemporaryDirectory(prefix="bench-market-") as d:
            market = Market.write(Path(d), sizes.latency_series, bars)
            clients = spread_subscriptions(market.series, sizes.latency_subscribers, 3)
            for system in points:
                p50s, p99s, loads = [], [], []
                for _ in range(rounds if load == sizes.latency_key_load else 1):
                    data = trio.run(
                        functools.partial(
                            run_round, system, market, clients, speed=f"{speed:g}",
                            observe=_observed(market),
                        )
                    )  # fmt: skip
                    lat, achieved = _latencies(data, market)
                    p50s.append(_percentile(lat, 0.5))
                    p99s.append(_percentile(lat, 0.99))
                    loads.append(achieved)
                    if system == "daemon" and load == sizes.latency_key_load:
                        key_p99.append(_percentile(lat, 0.99))
                        key_loads.append(achieved)
                points[system].append(
                    {
                        "load": load,
                        "achieved_load": median(loads),
                        "p50_ms": median(p50s),
                        "p99_ms": median(p99s),
                    }
                )
    png = plot.latency_png(points, sizes)
    return [
        Figure(
            "latency_p99_ms_5k_candles_50_subs",
            median(key_p99),
            "max",
            5.0,
            f"close frame sent → subscriber received, p99, {sizes.latency_key_load} closed"
            f" candles/s over {sizes.latency_series} series to {sizes.latency_subscribers}"
            " subscribers (3 series each)",
            {
                "rounds_p99_ms": key_p99,
                "rounds_achieved_load": key_loads,
                "sweep": points,
                "plot": png,
                "naive_relay_p99_ms": next(
                    p["p99_ms"] for p in points["naive"] if p["load"] == sizes.latency_key_load
                ),
            },
        )
    ]
