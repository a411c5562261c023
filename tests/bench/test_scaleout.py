"""The scale-out benchmark's pure part: how the subscribers are split between the edges, and
its nodes' CPU count (``make bench-smoke`` runs the whole of it against real PostgreSQL and
Redis)."""

from __future__ import annotations

import os
import time
from collections import Counter

from bench.micro import synthetic_series
from bench.rounds import spread_subscriptions
from bench.scaleout import cpu_seconds, split_clients


def test_every_client_goes_to_exactly_one_edge_and_the_edges_share_evenly() -> None:
    series = [str(s) for s in synthetic_series(400)]
    clients = spread_subscriptions(series, 1001, 3)
    shares = split_clients(clients, 2)
    assert [len(s) for s in shares] == [501, 500]
    assert sorted(map(tuple, shares[0] + shares[1])) == sorted(map(tuple, clients))
    # each edge serves (nearly) every series: a burst reaches both edges alike
    for share in shares:
        followers = Counter(sid for client in share for sid in client)
        assert set(followers) == set(series)


def test_one_edge_takes_every_client() -> None:
    clients = [["a"], ["b"], ["c"]]
    assert split_clients(clients, 1) == [clients]


def test_a_process_s_cpu_seconds_grow_with_the_cpu_it_spends() -> None:
    before = cpu_seconds(os.getpid())
    until = time.process_time() + 0.05
    while time.process_time() < until:
        pass
    assert cpu_seconds(os.getpid()) > before
