"""How big each benchmark runs: the full run (``make bench``, well under 15 minutes on 2
cores) and the smoke run (``make bench-smoke``, every scenario at a tiny size)."""

from __future__ import annotations

import attrs


@attrs.frozen
class Sizes:
    micro_rounds: int  # derive and parse: many short rounds, finely interleaved
    commit_rounds: int
    commit_minutes: int  # batches of 400 candles
    derive_minutes: int
    parse_repeat: int  # passes over the captured frames
    # the minute-boundary burst
    burst_symbols: int
    burst_subscribers: int
    burst_series_per_subscriber: int
    burst_warmup: int  # boundaries not measured (the first commits raise new_series events)
    burst_boundaries: int  # measured boundaries per round
    burst_speed: int  # replay speed: a boundary every 60/speed s
    burst_rounds: int
    # fan-out: (subscribers, candles) pairs, one series
    fanout: tuple[tuple[int, int], ...]
    fanout_rounds: int
    # latency: closed candles/s over latency_series series, each subscriber on 3 of them
    latency_series: int
    latency_subscribers: int
    latency_key_load: int
    latency_loads: tuple[int, ...]
    latency_seconds: float
    latency_rounds: int
    # ingest: replay --speed max → serve → committed
    ingest_series: int
    ingest_bars: int
    ingest_rounds: int
    # idle subscribers: RSS growth from rss_base to rss_base + rss_subscribers
    rss_base: int
    rss_subscribers: int
    rss_rounds: int


FULL = Sizes(
    micro_rounds=15,
    commit_rounds=15,
    commit_minutes=20,
    derive_minutes=10080,
    parse_repeat=60,
    burst_symbols=400,
    burst_subscribers=1000,
    burst_series_per_subscriber=3,
    burst_warmup=2,
    burst_boundaries=10,
    burst_speed=30,
    burst_rounds=3,
    fanout=((50, 400), (1000, 60)),
    fanout_rounds=2,
    latency_series=100,
    latency_subscribers=50,
    latency_key_load=5000,
    latency_loads=(1000, 2500, 5000, 8000),
    latency_seconds=3.0,
    latency_rounds=2,
    ingest_series=10,
    ingest_bars=300,
    ingest_rounds=3,
    rss_base=100,
    rss_subscribers=1000,
    rss_rounds=3,
)

SMOKE = Sizes(
    micro_rounds=1,
    commit_rounds=1,
    commit_minutes=2,
    derive_minutes=100,
    parse_repeat=1,
    burst_symbols=10,
    burst_subscribers=10,
    burst_series_per_subscriber=3,
    burst_warmup=1,
    burst_boundaries=1,
    burst_speed=120,
    burst_rounds=1,
    fanout=((3, 10),),
    fanout_rounds=1,
    latency_series=6,
    latency_subscribers=4,
    latency_key_load=60,
    latency_loads=(60,),
    latency_seconds=1.0,
    latency_rounds=1,
    ingest_series=2,
    ingest_bars=10,
    ingest_rounds=1,
    rss_base=2,
    rss_subscribers=5,
    rss_rounds=1,
)
