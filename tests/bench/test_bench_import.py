"""The import benchmark's harness: its profile of every thread."""

from __future__ import annotations

import pstats
import threading
from pathlib import Path

from bench.bench_import import profile_threads


def _in_a_worker() -> int:
    return sum(range(1000))


def _in_the_caller() -> None:
    worker = threading.Thread(target=_in_a_worker)
    worker.start()
    worker.join()


def test_the_profile_holds_the_threads_the_run_starts(tmp_path: Path) -> None:
    """Work done on a thread the run starts is in the profile, beside the caller's."""
    out = tmp_path / "import.prof"
    profile_threads(_in_the_caller, out)
    names = {name for (_, _, name) in pstats.Stats(str(out)).stats}  # type: ignore[attr-defined]
    assert {"_in_the_caller", "_in_a_worker"} <= names
    assert threading.getprofile() is None  # left as it was for threads started later
