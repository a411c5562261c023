"""Pictures and summaries of a run: the latency-vs-load PNG (matplotlib, the bench extra),
and a short text summary of a py-spy profile (the functions with the most samples)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Final

from bench.common import RESULTS, ROOT
from bench.sizes import FULL, Sizes

FULL_PNG: Final = ROOT / "docs" / "benchmarks-latency.png"
SMOKE_PNG: Final = RESULTS / "smoke-latency.png"
LABELS: Final = {"daemon": "tradecanvas serve", "naive": "naive trio-websocket relay"}


def latency_png(points: dict[str, list[dict[str, float]]], sizes: Sizes) -> str:
    """Delivery latency (p50, p99) against load for each system; returns the file written
    (docs/ for a full run, bench/results/ for any other size)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = FULL_PNG if sizes == FULL else SMOKE_PNG
    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    colors = {"daemon": "tab:red", "naive": "tab:blue"}
    for system, rows in points.items():
        rows = sorted(rows, key=lambda r: r["load"])
        loads = [r["load"] for r in rows]
        for q, style in (("p99_ms", "-o"), ("p50_ms", "--s")):
            ax.plot(
                loads,
                [r[q] for r in rows],
                style,
                color=colors.get(system),
                label=f"{LABELS[system]} {q[:3]}",
            )
        # what the replay achieved with this system behind it (a system that cannot keep
        # up slows the replay down: its reads set the pace)
        for r in rows:
            ax.annotate(
                f"{r['achieved_load']:,.0f}/s",
                (r["load"], r["p99_ms"]),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=7,
                color=colors.get(system),
            )
    ax.axhline(5.0, color="grey", linewidth=0.8, linestyle=":", label="p99 target (5 ms)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("closed candles/s requested of the replay (labels: what it achieved, closes/s)")
    ax.set_ylabel("close frame sent → subscriber received (ms)")
    ax.set_title(
        f"Delivery latency vs load: {sizes.latency_series} series, "
        f"{sizes.latency_subscribers} subscribers × 3 series"
    )
    ax.grid(True, which="both", linewidth=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return str(out.relative_to(ROOT))


def summarize_profile(raw: Path, top: int = 25) -> Path:
    """From py-spy's collapsed stacks (``--format raw``): the share of samples in which each
    function appears anywhere on the stack (inclusive) and at the top (self)."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        # "function (file:line)" → "function (file)": a function's lines summed
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for name in set(frames):
            inclusive[name] += count
        own[frames[-1]] += count
    out = raw.with_suffix(".summary.txt")
    lines = [f"{total} samples of the daemon during the burst (py-spy, all threads)", ""]
    for title, counter in (("inclusive", inclusive), ("self", own)):
        lines.append(f"-- top {top} by {title} share")
        for name, count in counter.most_common(top):
            lines.append(f"{count / max(total, 1):6.1%}  {name}")
        lines.append("")
    out.write_text("\n".join(lines))
    return out
