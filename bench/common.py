from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import attrs


@attrs.frozen
class Result:
    name: str
    ours_s: float
    baseline_s: float
    baseline: str
    unit_count: int
    unit: str

    def line(self) -> str:
        ratio = self.ours_s / self.baseline_s
        per = self.ours_s / self.unit_count * 1e6
        return (
            f"{self.name}: {ratio:.2f}x {self.baseline} "
            f"(ours {self.ours_s * 1e3:.1f} ms = {per:.1f} µs/{self.unit}; "
            f"baseline {self.baseline_s * 1e3:.1f} ms; n={self.unit_count})"
        )


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """Median of ``repeat`` timings: robust against a noisy neighbour."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
