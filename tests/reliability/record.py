"""The one line every reliability test prints (issue 17): what was tried and what survived.

A test calls :func:`report` once at its end with its figures; the line goes to the terminal
summary of the pytest run (see ``conftest.py``) and, when ``TRADECANVAS_RELIABILITY_OUT`` names
a file, is appended to it as JSON Lines (``make soak`` turns that file into
``docs/reliability.md``). :func:`soak` tells a test whether to run at full size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Final

import attrs
import orjson

OUT_VARIABLE: Final = "TRADECANVAS_RELIABILITY_OUT"
SOAK_VARIABLE: Final = "TRADECANVAS_SOAK"

# the lines reported in this pytest process, printed by conftest's terminal summary
REPORTED: list[str] = []


@attrs.frozen(kw_only=True)
class ReliabilityRecord:
    """``{"test", "seed", "faults", "attempted", "stored", "delivered", "lost", "duplicated"}``:
    ``faults`` counts the faults injected; ``attempted`` the candles (or messages) the source
    sent; ``stored`` and ``delivered`` what the store and subscribers ended with; ``lost`` and
    ``duplicated`` what a test found missing or doubled (0 and 0 is the promise)."""

    test: str
    seed: int
    faults: int
    attempted: int
    stored: int
    delivered: int
    lost: int
    duplicated: int


def soak() -> bool:
    """True under ``make soak`` (``TRADECANVAS_SOAK=1``): run at full size."""
    return os.environ.get(SOAK_VARIABLE) == "1"


def sized(reduced: int, full: int) -> int:
    """``full`` under ``make soak``, else ``reduced`` (the size ``make test`` runs)."""
    return full if soak() else reduced


def report(record: ReliabilityRecord) -> str:
    """Record one test's line; returns it (JSON, keys in the documented order)."""
    line = orjson.dumps(attrs.asdict(record)).decode()
    REPORTED.append(line)
    out = os.environ.get(OUT_VARIABLE)
    if out:
        with Path(out).open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")
    return line
