"""Run every benchmark and print one line each: ours vs. baseline, and the ratio."""

from __future__ import annotations

import sys

from bench.bench_hub import bench_hub_closed, bench_hub_forming, bench_hub_trickle
from bench.bench_pipeline import bench_derive, bench_pipeline_commit


def main() -> int:
    results = [
        bench_derive(),
        bench_pipeline_commit(),
        bench_hub_closed(),
        bench_hub_trickle(),
        bench_hub_forming(),
    ]
    for r in results:
        sys.stdout.write(r.line() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
