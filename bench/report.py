"""``python -m bench.report [SUMMARY]``: the figures of a summary as the markdown table of
docs/benchmarks.md (paste it there after a full run)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from bench.common import RESULTS


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.3g}"


def _baselines(key: str, raw: dict[str, Any]) -> str:
    """The figures behind a key, in words."""
    if key == "burst_ratio_vs_naive_relay":
        return (
            f"daemon {_fmt(raw['daemon_last_delivery_ms'])} ms, naive relay"
            f" {_fmt(raw['naive_last_delivery_ms'])} ms, raw frames"
            f" {_fmt(raw['raw_last_delivery_ms'])} ms; from the first close frame:"
            f" {_fmt(raw.get('daemon_from_first_close_ms', float('nan')))} /"
            f" {_fmt(raw.get('naive_from_first_close_ms', float('nan')))} /"
            f" {_fmt(raw.get('raw_from_first_close_ms', float('nan')))} ms; the replay sent"
            f" the 400 closes over {_fmt(raw['close_frames_spread_ms'])} ms; overlapped"
            f" boundaries {raw.get('overlapped_boundaries')}"
        )
    if key == "commit_ratio_vs_bare_sqlite":
        return (
            f"{_fmt(raw['pipeline_us_per_candle'])} µs/candle vs"
            f" {_fmt(raw['bare_sqlite_us_per_candle'])} µs; without derive"
            f" {_fmt(raw['ratio_without_derive'])}×"
        )
    if key == "derive_ratio_vs_naive":
        return (
            f"{_fmt(raw['derive_us_per_minute'])} µs/minute vs"
            f" {_fmt(raw['naive_us_per_minute'])} µs"
        )
    if key == "parse_ratio_vs_cryptofeed":
        return (
            f"{_fmt(raw['ours_frames_per_s'])} frames/s vs cryptofeed"
            f" {_fmt(raw['cryptofeed_frames_per_s'])}"
        )
    if key == "ingest_frames_per_s":
        return f"{raw['frames']:,} frames in {raw['seconds']:.2f} s (median)"
    if key == "fanout_ratio_vs_bare_trio_websocket":
        parts = []
        for size, v in raw.items():
            if isinstance(v, dict):
                parts.append(
                    f"{size.replace('_', ' ')}: {_fmt(v['daemon_deliveries_per_s'])}/s vs"
                    f" {_fmt(v['bare_trio_websocket_deliveries_per_s'])}/s"
                )
        return "; ".join(parts)
    if key == "latency_p99_ms_5k_candles_50_subs":
        loads = raw.get("rounds_achieved_load") or []
        achieved = ", ".join(f"{x:,.0f}" for x in loads)
        return (
            f"naive relay p99 {_fmt(raw['naive_relay_p99_ms'])} ms; achieved load {achieved}"
            " closed/s"
        )
    if key == "rss_kib_per_idle_subscriber":
        return ", ".join(f"{x:.1f}" for x in raw["rounds_per"]) + " KiB (rounds)"
    return ""


def table(summary: dict[str, Any]) -> str:
    m = summary["machine"]
    lines = [
        f"Run of {summary['date']} on {m['cores']} cores ({m['cpu_model']}), git"
        f" {str(summary['versions'].get('git_commit'))[:10]}; `all_pass`:"
        f" {summary['all_pass']}.",
        "",
        "| key | value | target | pass | behind it |",
        "|---|---|---|---|---|",
    ]
    for key, entry in summary["keys"].items():
        verdict = {True: "yes", False: "**no**", None: "—"}[entry["pass"]]
        lines.append(
            f"| `{key}` | {_fmt(entry['value'])} | {entry['target'] or '—'} | {verdict} |"
            f" {_baselines(key, entry['raw'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS / "summary.json"
    sys.stdout.write(table(json.loads(path.read_text())) + "\n")


if __name__ == "__main__":
    main()
