"""What a trader's second review of the chart page found (docs/chart.md), each against a real
``tradecanvas serve`` fed by ``tradecanvas replay`` of real Binance candles: the crosshair
leaving the bar the legend reads when live bars move the chart under a resting mouse, a tab
title with a price over a dead connection, an empty 3d chart without its reason, links that
lost their timeframe or their case, the price axis' label on the last bar in view instead of
the last price, and a time axis in the browser's locale. The tests read the chart's own
state (``window.tradecanvasChart``), never pixels, and wait on it, never on a sleep."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import attrs
import pytest
from playwright.sync_api import Browser

from tests.browser.rig import (
    BASE,
    FIVE,
    HOUR,
    TC,
    ChartPage,
    chart_page,
    late_history_chart,
    live_chart,
    replayed_day,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# the library draws (and moves its crosshair) in animation frames: two of them and what the
# chart shows is what it holds
FRAMES: Final = "() => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)))"
LEGEND: Final = "document.getElementById('legend').textContent"


def _point_at(chart: ChartPage, time_: int) -> tuple[float, float]:
    """The page coordinates of the bar at ``time_``, halfway up the chart."""
    box = chart.page.locator("#chart").bounding_box()
    assert box is not None
    x = chart.call(f"(t) => {TC}.chart.timeScale().timeToCoordinate(t)", time_)
    return box["x"] + x, box["y"] + box["height"] / 2


def test_the_crosshair_stays_on_the_bar_the_legend_reads_while_bars_arrive(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(tmp_path, browser, newest=True) as (m, chart, bars):
        past = bars[-10]
        x, y = _point_at(chart, past.time)
        chart.page.mouse.move(x, y)
        chart.wait_until(
            f"(t) => {TC}.reading().legend === t && {TC}.reading().crosshair === t", past.time
        )
        newest = bars[-1]
        for n in range(1, 4):
            # a new bar: the view follows the live edge, another bar slides under the mouse
            newest = attrs.evolve(newest, time=newest.time + 60, close=newest.close + n)
            m.ingest(BASE, newest)
            chart.wait_until(f"(t) => {TC}.lastClosed() === t", newest.time)
            chart.call(FRAMES)
            under = chart.call(
                f"(x) => {TC}.chart.timeScale().coordinateToTime(x - "
                "document.getElementById('chart').getBoundingClientRect().left)",
                x,
            )
            assert under != past.time  # the bars did move under the resting mouse
            # the legend and the crosshair name the same bar: the one the mouse chose
            assert chart.call(f"() => {TC}.reading()") == {
                "legend": past.time,
                "crosshair": past.time,
            }
            assert chart.call(f"() => {LEGEND}") == chart.call(f"(t) => {TC}.legend(t)", past.time)
        chart.screenshot("chart-crosshair-kept")
        assert chart.console_errors == []


def test_the_price_axis_labels_the_last_price_when_scrolled_back(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(tmp_path, browser, newest=True) as (m, chart, bars):
        assert chart.call(f"() => {TC}.priceLabel()") == bars[-1].close
        chart.call(f"() => {TC}.chart.timeScale().scrollToPosition(-300, false)")
        chart.wait_until(f"(t) => {TC}.visibleTimes().to < t", bars[-200].time)
        chart.call(FRAMES)
        in_view = chart.call(f"() => {TC}.visibleTimes().to")
        assert next(b for b in bars if b.time == in_view).close != bars[-1].close
        # the label marks the last price, as the dashed line does, not the last bar in view
        assert chart.call(f"() => {TC}.priceLabel()") == bars[-1].close
        newer = attrs.evolve(bars[-1], time=bars[-1].time + 60, close=bars[-1].close + 7)
        m.ingest(BASE, newer)
        chart.wait_until(f"(t) => {TC}.lastClosed() === t", newer.time)
        assert chart.call(f"() => {TC}.priceLabel()") == newer.close
        assert chart.call(f"() => {TC}.visibleTimes().to") == in_view  # still scrolled back
        chart.screenshot("chart-last-price-scrolled-back")


def test_the_time_axis_is_in_utc_and_english_whatever_the_browsers_locale(
    tmp_path: Path, browser: Browser
) -> None:
    japan = {"locale": "ja-JP", "timezone_id": "Asia/Tokyo"}
    with live_chart(tmp_path, browser, newest=True, device=japan) as (_, chart, bars):
        assert chart.call("() => Intl.DateTimeFormat().resolvedOptions().timeZone") == "Asia/Tokyo"
        bar = bars[-1]
        when = datetime.fromtimestamp(bar.time, UTC)
        # the crosshair's time label: the bar's time as the legend writes it
        label = chart.call(f"(t) => {TC}.chart.options().localization.timeFormatter(t)", bar.time)
        assert label == when.strftime("%Y-%m-%d %H:%M UTC")
        assert f"  {label}  " in chart.call(f"() => {TC}.legend()")
        # the tick marks: Year, Month, DayOfMonth, Time, TimeWithSeconds (TickMarkType)
        ticks = chart.call(
            f"(t) => [0, 1, 2, 3, 4].map((k) => {TC}.chart.options().timeScale"
            ".tickMarkFormatter(t, k, navigator.language))",
            bar.time,
        )
        assert ticks == [
            str(when.year),
            when.strftime("%b"),
            f"{when.day} {when:%b}",
            when.strftime("%H:%M"),
            when.strftime("%H:%M:%S"),
        ]
        # the axis says its zone: `UTC` in the corner right of it, under the price axis
        zone = chart.page.locator("#utc")
        assert zone.text_content() == "UTC"
        box, plot = zone.bounding_box(), chart.page.locator("#chart").bounding_box()
        assert box is not None and plot is not None
        assert box["width"] >= 30 and box["height"] >= 20
        assert abs(box["x"] + box["width"] - (plot["x"] + plot["width"])) < 1
        assert abs(box["y"] + box["height"] - (plot["y"] + plot["height"])) < 1
        chart.screenshot("chart-time-axis-ja-jp")
        assert chart.console_errors == []


def test_the_tab_title_says_when_its_price_may_be_old(tmp_path: Path, browser: Browser) -> None:
    with live_chart(tmp_path, browser, newest=True) as (m, chart, bars):
        live = f"{bars[-1].close:.1f} · {BASE} — tradecanvas"
        assert chart.call("() => document.title") == live
        assert m.stop_serve() == 0
        chart.wait_until(f"() => {TC}.state() === 'reconnecting'")
        assert chart.call("() => document.title") == f"⚠ reconnecting · {live}"
        m.start_serve()
        chart.wait_live()
        assert chart.call("() => document.title") == live


def test_a_link_keeps_its_timeframe_and_is_read_in_any_case(
    tmp_path: Path, browser: Browser
) -> None:
    with replayed_day(tmp_path) as (m, _), chart_page(browser, m.http_url) as chart:
        # a symbol not served: another symbol, in the timeframe asked for (it is served)
        eth = "binance:futures:ETH/USDT:1h"
        chart.open(eth)
        assert chart.call(f"() => {TC}.seriesId()") == HOUR
        chart.wait_until(f"() => {TC}.notice() !== ''")
        assert chart.call(f"() => {TC}.notice()") == (
            f"{eth} is not served by this daemon: showing {HOUR}"
        )
        # another case: the series it names, without a notice, the address as served
        for link in ("binance:futures:btc/usdt:1H", "BINANCE:FUTURES:BTC/USDT:1h"):
            chart.open(link)
            assert chart.call(f"() => {TC}.seriesId()") == HOUR
            chart.wait_live()
            assert chart.call(f"() => {TC}.notice()") == ""
            assert chart.page.url.endswith(f"?series={HOUR}")
        # 1M is a month, never the minute: not served, the nearest served (1h), said so
        month = "binance:futures:BTC/USDT:1M"
        chart.open(month)
        assert chart.call(f"() => {TC}.seriesId()") == HOUR
        chart.wait_until(f"() => {TC}.notice() !== ''")
        assert chart.call(f"() => {TC}.notice()").startswith(f"{month} is not served")
        # a timeframe chosen is in the address: a reload shows it again
        chart.page.get_by_role("button", name="5m", exact=True).click()
        chart.wait_until(f"(s) => {TC}.seriesId() === s && {TC}.ready()", FIVE)
        assert chart.page.url.endswith(f"?series={FIVE}")
        chart.page.reload()
        chart.wait_until(f"(s) => {TC} && {TC}.seriesId() === s && {TC}.ready()", FIVE)
        assert chart.console_errors == []


def test_an_empty_3d_chart_says_by_when_its_first_bar_opens(
    tmp_path: Path, browser: Browser
) -> None:
    # the store starts at 2025-07-06 08:00, inside a 3-day bar of any phase
    with late_history_chart(tmp_path, browser, "1d,3d") as chart:
        sid = BASE.replace(":1m", ":3d")
        chart.page.get_by_role("button", name="3d", exact=True).click()
        chart.wait_until(f"(s) => {TC}.seriesId() === s && {TC}.ready()", sid)
        chart.wait_live()
        assert chart.bars(sid) == []
        # its phase is the symbol's own (2025-07-07 for BTC/USDT futures): within three days
        assert chart.call(f"() => {TC}.legend()") == (
            f"{sid} — no candles yet: the first 3d bar opens by 2025-07-09"
            " (this 3-day period began before the stored history)"
        )
        chart.screenshot("chart-3d-before-history")
        assert chart.console_errors == []
