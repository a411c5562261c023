"""What a trader's review of the chart page found (docs/chart.md), each against a real
``tradecanvas serve`` fed by ``tradecanvas replay`` of real Binance candles: prices shown
with two decimals whatever the asset (ADA/BTC at 0.0000061 was ``0.00``), a monthly chart
empty without a word, a page left ``live`` over a series the restarted daemon no longer
serves, a timeframe switched while the daemon is down blanked with ``no candles yet``, and a
badge cut short in jargon (``closed 1006``)."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Final

import pytest
from playwright.sync_api import Browser, Route

from tests.browser.rig import (
    BASE,
    FIVE,
    TC,
    WHOLE,
    chart_page,
    late_history_chart,
    live_chart,
    market,
    replayed_day,
)
from tests.conftest import binance_data_dir

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

ADA: Final = "binance:spot:ADA/BTC:1m"
ADA_CSV: Final = "klines_1m_5m/spot_octobot/ADABTC-1m-2020-04-28_octobot.csv"
ADA_HISTORY: Final = 300  # REST history; the other 200 bars are streamed
EVERY_TIMEFRAME: Final = "3m,5m,15m,30m,1h,2h,4h,1d,1w,1M"


def _decimals(text: str) -> int:
    """The decimals of Binance's price string without its trailing zeros."""
    return len(text.split(".")[1].rstrip("0")) if "." in text else 0


def test_prices_are_shown_with_the_decimals_the_asset_needs(
    tmp_path: Path, browser: Browser
) -> None:
    with (binance_data_dir() / ADA_CSV).open(newline="") as f:
        rows = list(csv.DictReader(f))
    decimals = max(_decimals(r[k]) for r in rows for k in ("open", "high", "low", "close"))
    assert decimals == 8  # 0.00000611: two decimals showed 0.00
    newest = int(rows[-1]["open_time"]) // 1000
    data = f"{ADA}={binance_data_dir() / ADA_CSV}"
    with (
        market(
            tmp_path,
            data,
            "--market",
            "spot",
            "--start-at",
            str(ADA_HISTORY),
            TRADE_CANVAS_SERIES=ADA,
            TRADE_CANVAS_INITIAL_BACKFILL_CANDLES=str(ADA_HISTORY),
            TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
        ) as m,
        chart_page(browser, m.http_url) as live,
        chart_page(browser, m.http_url) as loaded,
    ):
        # one page gets every bar over /ws/market (the backfill, then the stream) ...
        live.open(ADA)
        live.wait_live()
        m.resume_replay()
        live.wait_until(f"(t) => {TC}.lastClosed() === t", newest)
        # ... the other from HTTP: both show what the prices need, axis and legend alike
        loaded.open(ADA)
        loaded.wait_live()
        for chart in (live, loaded):
            assert chart.call(f"() => {TC}.decimals()") == decimals
            close = float(rows[-1]["close"])
            written = f"{close:.{decimals}f}"  # 0.00000610
            assert chart.call(f"(x) => {TC}.axisPrice(x)", close) == written
            assert f"C {written}" in chart.call(f"() => {TC}.legend()")
            assert chart.call("() => document.title").startswith(f"{written} · ")
            for r in rows[-5:]:
                shown = chart.call(f"(t) => {TC}.legend(t)", int(r["open_time"]) // 1000)
                for label, k in (("O", "open"), ("H", "high"), ("L", "low"), ("C", "close")):
                    assert f"{label} {float(r[k]):.{decimals}f}" in shown, shown
            assert chart.console_errors == []
        loaded.screenshot("chart-ada-btc")


def test_a_month_that_began_before_the_stored_history_says_when_its_first_bar_is(
    tmp_path: Path, browser: Browser
) -> None:
    # the store starts at 2025-07-06 08:00 (a Sunday), inside a day, a week and a month; the
    # stream ends before the next day
    with late_history_chart(tmp_path, browser, "1d,1w,1M") as chart:
        scale = f"{TC}.chart.priceScale('right').options()"
        assert chart.call(f"() => {scale}.visible")
        for tf, first, period in (
            ("1M", "2025-08-01", "month"),
            ("1w", "2025-07-07", "week"),
            ("1d", "2025-07-07", "day"),
        ):
            sid = BASE.replace(":1m", f":{tf}")
            chart.page.get_by_role("button", name=tf, exact=True).click()
            chart.wait_until(f"(s) => {TC}.seriesId() === s && {TC}.ready()", sid)
            chart.wait_live()
            assert chart.call(f"() => {TC}.legend()") == (
                f"{sid} — no candles yet: the first {tf} bar is {first}"
                f" (this {period} began before the stored history)"
            )
            # no bars: no price axis left over from the series shown before
            assert chart.call(f"() => {scale}.visible") is False
            # days, months and years on the time axis: no hours for days and longer
            assert chart.call(f"() => {TC}.chart.options().timeScale.timeVisible") is False
        chart.screenshot("chart-month-before-history")
        assert chart.console_errors == []


def test_a_restarted_daemon_serving_other_timeframes_shows_a_served_one(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(tmp_path, browser, series=FIVE) as (m, chart, bars):
        # every badge state shown from now on, with the series it was shown over
        chart.call(
            """() => { window.shown = [];
            new MutationObserver(() => window.shown.push(
                [window.tradecanvasChart.state(), window.tradecanvasChart.seriesId()]))
              .observe(document.getElementById('state'),
                       {attributes: true, childList: true, subtree: true}); }"""
        )
        assert m.stop_serve() == 0
        chart.wait_until(f"() => {TC}.state() === 'reconnecting'")
        m.extra_env["TRADE_CANVAS_DERIVED_TIMEFRAMES"] = "1h"  # 5m is served no more
        m.start_serve()
        chart.wait_until(f"(s) => {TC}.seriesId() === s && {TC}.ready()", BASE)
        chart.wait_live()
        assert chart.call(f"() => {TC}.notice()") == (
            f"{FIVE} is no longer served by this daemon: showing {BASE}"
        )
        buttons = chart.page.locator("#timeframes button").all_text_contents()
        assert buttons == ["1m", "1h"]
        assert chart.bars(BASE)[-1] == bars[-1]
        shown = chart.call("() => window.shown")
        assert ["live", FIVE] not in shown, shown  # never `live` over the unserved series
        assert chart.page.url.endswith(f"?series={BASE}")
        chart.screenshot("chart-timeframe-gone")


def test_a_timeframe_chosen_while_the_daemon_is_down_keeps_the_chart_until_it_loads(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(tmp_path, browser, newest=True) as (m, chart, _):
        held = len(chart.bars(BASE))
        assert m.stop_serve() == 0
        chart.wait_until(f"() => {TC}.state() === 'reconnecting'")
        chart.page.get_by_role("button", name="5m", exact=True).click()
        chart.wait_until(f"() => {TC}.notice().startsWith('cannot load ')")
        legend = chart.call(f"() => {TC}.legend()")
        assert legend.startswith(f"{FIVE} — loading…"), legend
        assert "no candles yet" not in legend
        assert chart.call(f"() => {TC}.drawn()") == held  # the 1m chart stays
        chart.screenshot("chart-switch-while-down")
        m.start_serve()
        chart.wait_until(f"(s) => {TC}.seriesId() === s && {TC}.ready()", FIVE)
        chart.wait_live()
        assert chart.call(f"() => {TC}.drawn()") == len(chart.bars(FIVE)) > 0
        assert chart.call(f"() => {TC}.notice()") == ""


def test_the_badge_says_in_plain_words_why_it_reconnects_and_all_of_it_shows(
    tmp_path: Path, browser: Browser
) -> None:
    with live_chart(
        tmp_path,
        browser,
        series="",  # an empty ?series= is no series named: no notice
        serve_env={"TRADE_CANVAS_DERIVED_TIMEFRAMES": EVERY_TIMEFRAME},
    ) as (m, chart, _):  # 1280 px wide
        assert chart.call(f"() => {TC}.seriesId()") == BASE
        assert chart.call(f"() => {TC}.notice()") == ""
        assert chart.call(f"() => {TC}.decimals()") == 1  # BTC futures: a tick of 0.1
        assert m.stop_serve() == 0
        # each attempt after the daemon stopped says so, not only the first
        chart.wait_until(f"() => {TC}.badge().includes('retry 3 ')")
        badge = chart.call(f"() => {TC}.badge()")
        assert badge.startswith("reconnecting: daemon stopped · retry 3 in "), badge
        assert chart.call(WHOLE)
        chart.screenshot("chart-badge-daemon-stopped")


def test_a_series_list_that_failed_to_load_is_asked_again(tmp_path: Path, browser: Browser) -> None:
    with replayed_day(tmp_path) as (m, _), chart_page(browser, m.http_url) as chart:
        failed: list[str] = []

        def first_fails(route: Route) -> None:
            if not failed:
                failed.append(route.request.url)
                route.abort()
            else:
                route.continue_()

        chart.page.route("**/api/market/series", first_fails)
        chart.open(BASE)
        assert failed
        chart.wait_live()
        assert chart.call(f"() => {TC}.notice()") == ""
