"""What every benchmark shares: the figures it reports, medians, the machine and versions.

A benchmark returns :class:`Figure` objects: one per key of the summary (issue 14's table),
each with its target and the raw medians behind it (ours and each baseline's own figure).
Ratios are taken against a baseline measured in the same run, because this machine is
shared and absolute times are noise.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final, Literal

import attrs

from tradecanvas.runtime_flags import binance_data_dir

ROOT: Final = Path(__file__).resolve().parent.parent
RESULTS: Final = ROOT / "bench" / "results"
BTC_WEEK: Final = "klines_1m_5m/futures_um/BTCUSDT-1m-2025-07-06_2025-07-12.csv"
WS_FRAMES: Final = "ws/futures_um/kline_1m_frames_2021-07-22T22-25Z.jsonl"

Goal = Literal["min", "max", "record"]


@attrs.frozen
class Figure:
    """One summary key: its value, the target it must meet (``goal`` says which way), and
    the raw medians it was computed from (seconds, counts, and each baseline's figure)."""

    key: str
    value: float
    goal: Goal
    target: float | None
    what: str
    raw: dict[str, object] = attrs.field(factory=dict)

    @property
    def passed(self) -> bool | None:
        if self.target is None or self.goal == "record":
            return None
        return self.value >= self.target if self.goal == "min" else self.value <= self.target

    def to_json(self) -> dict[str, object]:
        return {
            "value": round(self.value, 4),
            "target": None if self.target is None else _target_text(self.goal, self.target),
            "pass": self.passed,
            "what": self.what,
            "raw": self.raw,
        }

    def line(self, *, judged: bool = True) -> str:
        """One line for the terminal; a smoke run's figures are not judged (tiny sizes)."""
        verdict = {True: "PASS", False: "FAIL", None: "    "}[self.passed] if judged else "    "
        target = "" if self.target is None else f" (target {_target_text(self.goal, self.target)})"
        return f"{verdict} {self.key} = {self.value:.4g}{target}"


def _target_text(goal: Goal, target: float) -> str:
    return f">= {target:g}" if goal == "min" else f"<= {target:g}"


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("no rounds measured")
    return float(statistics.median(values))


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def alternate(
    rounds: int, ours: Callable[[], float], *baselines: Callable[[], float]
) -> list[list[float]]:
    """``rounds`` timings of each, interleaved so a noisy neighbour hits every side alike;
    one list per function (ours first)."""
    out: list[list[float]] = [[] for _ in range(1 + len(baselines))]
    for _ in range(rounds):
        for i, fn in enumerate((ours, *baselines)):
            out[i].append(fn())
    return out


def data_file(relative: str) -> Path:
    folder = binance_data_dir()
    if folder is None:
        raise RuntimeError("no Binance data folder: see docs/configuration.md (make test-data)")
    return folder / relative


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def machine() -> dict[str, object]:
    return {
        "cores": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }


def versions() -> dict[str, object]:
    names = ("tradecanvas", "trio", "trio-websocket", "wsproto", "orjson", "cattrs", "hypercorn")
    extra = ("cryptofeed", "matplotlib", "py-spy")
    return {
        "git_commit": _git_commit(),
        **{name: _version(name) for name in (*names, *extra)},
    }


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
