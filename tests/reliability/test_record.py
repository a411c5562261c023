from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from tests.reliability import record
from tests.reliability.record import ReliabilityRecord, report, sized


def test_report_writes_one_json_line_with_the_documented_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "lines.jsonl"
    monkeypatch.setenv(record.OUT_VARIABLE, str(out))
    rec = ReliabilityRecord(
        test="t", seed=7, faults=3, attempted=10, stored=10, delivered=9, lost=1, duplicated=0
    )
    line = report(rec)
    assert list(orjson.loads(line)) == [
        "test",
        "seed",
        "faults",
        "attempted",
        "stored",
        "delivered",
        "lost",
        "duplicated",
    ]
    assert out.read_text().splitlines() == [line]
    record.REPORTED.remove(line)


def test_sized_picks_the_full_size_only_under_soak(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(record.SOAK_VARIABLE, raising=False)
    assert sized(20, 200) == 20
    monkeypatch.setenv(record.SOAK_VARIABLE, "1")
    assert sized(20, 200) == 200
