"""``python -m bench [--smoke] [--only KEYS] [--rounds N] [--out FILE] [--profile]``.

Runs the benchmarks of issue 14 and writes ``bench/results/summary.json``: one entry per
key with its target, pass/fail and the raw medians behind it, plus the machine, the
versions and the date. ``--smoke`` runs every scenario at a tiny size (under a minute) to
prove the harness works; it checks no numbers. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from bench import bench_import, micro, scaleout, scenarios, standalone
from bench.common import RESULTS, Figure, machine, utc_now, versions
from bench.sizes import FULL, SMOKE, Sizes

# key → the function that measures it (several keys share one scenario)
Bench = Callable[[Sizes, int | None, bool], list[Figure]]
BENCHES: Final[dict[str, Bench]] = {
    "commit": lambda s, r, p: [micro.bench_commit(r or s.commit_rounds, s.commit_minutes)],
    "derive": lambda s, r, p: [micro.bench_derive(r or s.micro_rounds, s.derive_minutes)],
    "parse": lambda s, r, p: [micro.bench_parse(r or s.micro_rounds, s.parse_repeat)],
    "burst": lambda s, r, p: scenarios.bench_burst(s, r, profile=p),
    "ingest": lambda s, r, p: [standalone.bench_ingest(s, r)],
    "fanout": lambda s, r, p: [scenarios.bench_fanout(s, r)],
    "latency": lambda s, r, p: scenarios.bench_latency(s, r),
    "rss": lambda s, r, p: [standalone.bench_rss(s, r)],
    # issue 16: tradecanvas import of a year of archive zips (bench/bench_import.py)
    "import": lambda s, r, p: bench_import.bench_import(s, r),
    "scaleout": lambda s, r, p: scaleout.bench_scaleout(s, r),
}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks no numbers")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated benchmarks or summary keys (default all: {','.join(BENCHES)})",
    )
    parser.add_argument(
        "--rounds", type=int, help="rounds per side (default: per benchmark, bench/sizes.py)"
    )
    parser.add_argument(
        "--out", type=Path, help="summary file (default bench/results/summary.json)"
    )
    parser.add_argument("--profile", action="store_true", help="py-spy on the daemon in the burst")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    # a benchmark's name, or a summary key it measures (burst_ratio_vs_naive_relay → burst)
    only: list[str] = []
    for name in [k for k in args.only.split(",") if k] or list(BENCHES):
        first_word = name.split("_", 1)[0]
        name = first_word if first_word in BENCHES else name
        if name not in only:
            only.append(name)
    unknown = [k for k in only if k not in BENCHES]
    if unknown:
        sys.stderr.write(f"unknown benchmark(s): {', '.join(unknown)}\n")
        return 2
    sizes = SMOKE if args.smoke else FULL
    rounds: int | None = args.rounds  # None: each benchmark's own default (bench/sizes.py)
    out: Path = args.out or (RESULTS / ("smoke-summary.json" if args.smoke else "summary.json"))
    figures: list[Figure] = []
    seconds: dict[str, float] = {}
    # the commit measured, not a later one
    started: dict[str, object] = {"date": utc_now(), "versions": versions()}
    for name in only:
        start = time.monotonic()
        sys.stdout.write(f"== {name}\n")
        sys.stdout.flush()
        for figure in BENCHES[name](sizes, rounds, args.profile):
            figures.append(figure)
            sys.stdout.write(figure.line(judged=not args.smoke) + "\n")
            sys.stdout.write(f"     {json.dumps(figure.raw, default=str)[:600]}\n")
            sys.stdout.flush()
        seconds[name] = round(time.monotonic() - start, 1)
        # after every benchmark, so that an interrupted run keeps what it measured
        _write(out, started, args.smoke, rounds, only, seconds, figures)
    sys.stdout.write(f"wrote {out}\n")
    return 0


def _write(
    out: Path,
    started: dict[str, object],
    smoke: bool,
    rounds: int | None,
    only: list[str],
    seconds: dict[str, float],
    figures: list[Figure],
) -> None:
    summary = {
        "date": started["date"],
        "finished": utc_now(),
        "smoke": smoke,
        "rounds": rounds,
        "benchmarks_run": only,
        "seconds_per_benchmark": seconds,
        "machine": machine(),
        "versions": started["versions"],
        "all_pass": all(f.passed is not False for f in figures),
        "keys": {f.key: f.to_json() for f in figures},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
