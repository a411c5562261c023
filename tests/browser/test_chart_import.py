"""The chart page and ``tradecanvas import`` beside the daemon: the import's
``factor.rebuild`` reaches the open page live (the daemon's event tail) and the page reloads
the imported range. Headless Chromium, real ``serve`` and ``replay``, the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Final

import attrs
import pytest
from playwright.sync_api import Browser

from tests.browser.rig import BASE, Bar, chart_page, live_chart, replayed_day
from tests.cli_rig import cli_env

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

HISTORY: Final = 120  # the daemon's REST history: the bars the page holds
STREAMED: Final = 10  # then streamed, live to the page
REVISED: Final = 10  # minutes of the history the import brings again, changed


def import_bars(tmp_path: Path, name: str, bars: list[Bar], *, header: bool) -> None:
    """``tradecanvas import`` of ``bars`` as an archive CSV (six columns, ms; with or without
    the header row) into the market's store, beside the running daemon."""
    csv = tmp_path / name
    csv.write_text(
        ("open_time,open,high,low,close,volume\n" if header else "")
        + "".join(
            f"{b.time * 1000},{b.open!r},{b.high!r},{b.low!r},{b.close!r},{b.volume!r}\n"
            for b in bars
        )
    )
    env = cli_env(TRADE_CANVAS_DB_PATH=str(tmp_path / "market.sqlite3"))
    env["TRADE_CANVAS_DERIVED_TIMEFRAMES"] = "5m,1h"
    done = subprocess.run(
        [sys.executable, "-m", "tradecanvas", "import", "--series", BASE, str(csv)],
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr.decode()


def test_an_import_beside_the_daemon_is_reloaded_by_the_open_page(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(
        tmp_path, browser, minutes=HISTORY + STREAMED, start_at=HISTORY, streamed=False
    ) as (m, chart, bars):
        # the archive's six-column layout: ten held minutes, each 50 higher
        changed = [
            attrs.evolve(b, high=b.high + 50, close=b.high + 50) for b in bars[50 : 50 + REVISED]
        ]
        m.resume_replay()
        chart.wait_until("(t) => window.tradecanvasChart.lastClosed() === t", bars[-1].time)
        import_bars(tmp_path, "revised.csv", changed, header=True)
        expected_rebuild = {
            "reason": "import",
            "from_time": changed[0].time,
            "to_time": changed[-1].time,
        }
        chart.wait_until(
            "(r) => window.tradecanvasChart.rebuilds().some((x) => x.reason === r.reason"
            " && x.from_time === r.from_time && x.to_time === r.to_time)",
            expected_rebuild,
        )
        chart.wait_until(
            "([sid, t, close]) => window.tradecanvasChart.data(sid)"
            ".some((b) => b.time === t && b.close === close)",
            [BASE, changed[-1].time, changed[-1].close],
        )
        rebuilds = chart.call("() => window.tradecanvasChart.rebuilds()")
        assert [r for r in rebuilds if r["reason"] == "import"] == [expected_rebuild]  # once
        assert chart.bars(BASE) == m.stored(BASE)
        assert chart.console_errors == []


def test_an_import_into_a_series_the_page_shows_empty_fills_the_page(
    tmp_path: Path, browser: Browser
) -> None:
    with (
        replayed_day(tmp_path, minutes=HISTORY, start_at=0) as (m, bars),
        chart_page(browser, m.http_url) as chart,
    ):
        imported = bars[:HISTORY]
        assert m.stored(BASE) == []  # the replay is paused before its first minute
        chart.open(BASE)
        chart.wait_live()
        assert chart.bars(BASE) == []
        import_bars(tmp_path, "history.csv", imported, header=False)
        chart.wait_until(
            "([sid, n]) => window.tradecanvasChart.data(sid).length === n", [BASE, len(imported)]
        )
        assert chart.bars(BASE) == m.stored(BASE) == imported
        assert chart.call("() => window.tradecanvasChart.lastClosed()") == imported[-1].time
        assert chart.console_errors == []
