"""A file is parsed with the cyclic GC paused, and the collector is left as it was found."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from tradecanvas.model import SeriesId
from tradecanvas.tools.importer.files import ArchiveFileError, plan_file, read_file

SERIES = SeriesId.parse("binance:spot:BTC/USDT:1m")
T0 = 1_577_836_800  # 2020-01-01 00:00 UTC


pytestmark = pytest.mark.usefixtures("gc_restored")


def _row(t: int, high: str = "2") -> str:
    return f"{t * 1000},1,{high},1,1,5,{(t + 60) * 1000 - 1},5,1,1,1,0\n"


def test_the_collector_is_enabled_after_a_file_read_or_refused(tmp_path: Path) -> None:
    gc.enable()
    good = tmp_path / "good.csv"
    good.write_text(_row(T0) + _row(T0 + 60))
    assert len(read_file(plan_file(good, SERIES, None)).candles) == 2
    assert gc.isenabled()
    bad = tmp_path / "bad.csv"
    bad.write_text(_row(T0) + _row(T0 + 60, high="0.5"))
    with pytest.raises(ArchiveFileError, match=r"line 2: high 0\.5 is below low 1"):
        read_file(plan_file(bad, SERIES, None))
    assert gc.isenabled()


def test_a_collector_the_caller_disabled_stays_disabled(tmp_path: Path) -> None:
    gc.disable()
    path = tmp_path / "rows.csv"
    path.write_text(_row(T0))
    read_file(plan_file(path, SERIES, None))
    assert not gc.isenabled()
