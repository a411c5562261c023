"""The benchmark harness's pure parts (``make bench-smoke`` runs the whole of it)."""

from __future__ import annotations

import struct
from collections import Counter
from pathlib import Path

import pytest

from bench.common import Figure
from bench.micro import synthetic_series
from bench.plot import summarize_profile
from bench.relays import text_frame
from bench.report import table
from bench.rounds import spread_subscriptions
from bench.scenarios import SYSTEMS, round_order


@pytest.mark.parametrize(
    ("size", "header"),
    [
        (5, bytes([0x81, 5])),
        (125, bytes([0x81, 125])),
        (126, bytes([0x81, 126]) + struct.pack("!H", 126)),
        (70_000, bytes([0x81, 127]) + struct.pack("!Q", 70_000)),
    ],
)
def test_text_frame_is_one_unmasked_final_text_frame(size: int, header: bytes) -> None:
    payload = b"x" * size
    assert text_frame(payload) == header + payload


def test_subscriptions_are_spread_evenly_and_distinct_per_client() -> None:
    series = [str(s) for s in synthetic_series(400)]
    clients = spread_subscriptions(series, 1000, 3)
    assert all(len(set(c)) == 3 for c in clients)
    followers = Counter(s for c in clients for s in c)
    assert set(followers) == set(series)
    assert max(followers.values()) - min(followers.values()) <= 1


def test_burst_rounds_run_every_system_once_each_after_a_different_one() -> None:
    orders = [round_order(r) for r in range(len(SYSTEMS))]
    assert all(sorted(o) == sorted(SYSTEMS) for o in orders)
    # over len(SYSTEMS) rounds each system is first once (runs after another system's round)
    assert {o[0] for o in orders} == set(SYSTEMS)
    assert round_order(len(SYSTEMS)) == round_order(0)


def test_synthetic_series_are_distinct_binance_futures_symbols() -> None:
    series = synthetic_series(500)
    assert len({s.symbol for s in series}) == 500
    assert str(series[0]) == "binance:futures:AAA/USDT:1m"


def test_figure_verdicts() -> None:
    assert Figure("k", 1.0, "min", 1.0, "").passed is True
    assert Figure("k", 0.9, "min", 1.0, "").passed is False
    assert Figure("k", 2.5, "max", 2.0, "").passed is False
    assert Figure("k", 5.0, "record", None, "").passed is None
    assert Figure("k", 1.5, "max", 1.5, "").to_json()["target"] == "<= 1.5"


def test_profile_summary_counts_each_function_once_per_sample(tmp_path: Path) -> None:
    raw = tmp_path / "p.raw"
    raw.write_text("main (a.py:1);f (a.py:2);f (a.py:3) 3\nmain (a.py:1);g (a.py:9) 1\n")
    text = summarize_profile(raw).read_text()
    assert text.startswith("4 samples")
    assert "100.0%  main (a.py)" in text
    assert " 75.0%  f (a.py)" in text


def test_report_table_names_every_key() -> None:
    summary = {
        "date": "2026-12-02T00:00:00Z",
        "machine": {"cores": 2, "cpu_model": "cpu"},
        "versions": {"git_commit": "abc"},
        "all_pass": False,
        "keys": {
            "rss_kib_per_idle_subscriber": {
                **Figure("rss_kib_per_idle_subscriber", 28.0, "max", 50.0, "").to_json(),
                "raw": {"rounds_per": [28.0]},
            }
        },
    }
    assert "| `rss_kib_per_idle_subscriber` | 28 | <= 50 | yes |" in table(summary)
