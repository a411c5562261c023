"""The chart page as a trader uses it (a review of the page, 2026-12-04): clicking quickly
through timeframes, choosing one while the daemon is down, reading a past bar's values while
the market is live, a narrow window, a link to a series that is not served. Headless
Chromium against a real ``tradecanvas serve`` fed by ``tradecanvas replay`` of real Binance
candles; the tests wait on the page's own data, never on a sleep."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
from playwright.sync_api import Browser

from tests.browser.rig import BASE, FIVE, HOUR, ChartPage, live_chart

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def _selected_and_live(chart: ChartPage, series_id: str) -> None:
    chart.wait_until(f"() => window.tradecanvasChart.seriesId() === {series_id!r}")
    chart.wait_until("() => window.tradecanvasChart.ready()")
    chart.wait_live()


def test_clicking_quickly_through_timeframes_ends_live_on_the_last_one(
    tmp_path: Path, browser: Browser
) -> None:
    """Sixty switches at once — three messages each, far over the daemon's 20 a second: the
    page paces what it sends and takes back what a later switch makes needless, so nothing
    is refused and the last choice goes live with its bars."""
    with live_chart(tmp_path, browser) as (m, chart, _):
        chart.call(
            "([a, b, c]) => { for (let i = 0; i < 60; i++)"
            " window.tradecanvasChart.select([a, b, c][i % 3]); }",
            [BASE, FIVE, HOUR],
        )
        _selected_and_live(chart, HOUR)  # the last of them: 59 % 3 == 2
        assert chart.call("() => window.tradecanvasChart.errors()") == []
        shown = chart.bars(HOUR)
        assert shown and shown == m.stored(HOUR)[-len(shown) :]
        assert chart.console_errors == []


def test_a_timeframe_chosen_while_the_daemon_is_down_loads_once_it_is_back(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(tmp_path, browser) as (m, chart, _):
        assert m.stop_serve() == 0
        chart.wait_until("() => window.tradecanvasChart.state() === 'reconnecting'")
        chart.page.get_by_role("button", name="5m", exact=True).click()
        # a few attempts fail while the daemon is down (the badge says why; no notice
        # blames the page's origin any more after a plain stop)
        chart.wait_until("() => /retry [3-9]/.test(document.querySelector('#state').innerText)")
        assert not chart.call("() => window.tradecanvasChart.ready()")
        m.start_serve()
        _selected_and_live(chart, FIVE)
        assert chart.bars(FIVE) == m.stored(FIVE)[-len(chart.bars(FIVE)) :]
        assert chart.call("() => window.tradecanvasChart.notice()") == ""


def test_the_legend_keeps_the_bar_under_the_cursor_while_bars_arrive(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(tmp_path, browser) as (m, chart, bars):
        past = bars[-10]
        box = chart.page.locator("#chart").bounding_box()
        assert box is not None
        x = chart.call(
            "(t) => window.tradecanvasChart.chart.timeScale().timeToCoordinate(t)", past.time
        )
        chart.page.mouse.move(box["x"] + x, box["y"] + box["height"] / 2)
        hovered = chart.call("() => document.getElementById('legend').textContent")
        assert f"C {past.close:.1f}" in hovered
        # a new bar arrives (the newest, not hovered): the legend stays on the past bar
        newer = attrs.evolve(bars[-1], time=bars[-1].time + 60, close=bars[-1].close + 1)
        m.ingest(BASE, newer)
        chart.wait_until("(t) => window.tradecanvasChart.lastClosed() === t", newer.time)
        # the bar under the cursor (the view may have moved a bar under the still mouse),
        # not the newest one
        shown = chart.call("() => document.getElementById('legend').textContent")
        near = [
            chart.call("(t) => window.tradecanvasChart.legend(t)", b.time) for b in bars[-12:-7]
        ]
        assert shown in near, (shown, near)
        assert shown != chart.call("() => window.tradecanvasChart.legend()")


def test_a_narrow_window_shows_the_whole_legend_and_a_bad_link_says_so(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(
        tmp_path,
        browser,
        series="binance:futures:DOGE/USDT:5m",
        device={"viewport": {"width": 800, "height": 600}},
    ) as (_, chart, _):
        # another symbol in the timeframe the link asked for (served)
        assert chart.call("() => window.tradecanvasChart.seriesId()") == FIVE
        chart.wait_until("() => window.tradecanvasChart.notice().includes('is not served')")
        legend = chart.page.locator("#legend")
        assert "V " in legend.inner_text()
        # nothing of it cut off: it wraps within the window
        width = chart.call("() => document.getElementById('legend').scrollWidth")
        assert width <= chart.call("() => document.getElementById('legend').clientWidth")
        assert chart.call("() => document.documentElement.scrollWidth") <= 800
