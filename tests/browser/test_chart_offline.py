"""The chart page when the daemon is up but cannot reach Binance (``make run`` offline; a
first-time user's review, docs/chart.md): it said a green ``live`` over an empty chart for
90 s, then a ``stale`` whose cause was cut off; and a trader's review: a live chart whose
source went away stayed a green ``live`` for 94 s. Now it asks ``/healthz`` (its
``upstream``) when a series is shown and every 3 s while live, and says why within seconds,
the cause first."""

from __future__ import annotations

from pathlib import Path
from typing import Final
from urllib.parse import quote

import pytest
from playwright.sync_api import Browser

from tests.browser.rig import (
    BASE,
    TC,
    WATCH,
    WHOLE,
    ChartPage,
    Market,
    chart_page,
    live_chart,
    replayed_day,
    wait_for_line,
)

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

# the age counts without a heartbeat ping, whose pong a jumped clock would miss
NO_HEARTBEAT: Final = {"heartbeatMs": 3_600_000}


def _lose_binance(m: Market) -> None:
    """The exchange goes away: returns once the daemon has failed to connect to it again."""
    m.replay.kill()
    m.replay.wait(timeout=30)
    assert m.serve is not None
    log = m.tmp_path / f"serve-{m.starts}.log"
    wait_for_line(log, r"connect failed \(\d+\)", m.serve)


def _no_errors(chart: ChartPage) -> None:
    # /healthz answers 200 whatever it says: the browser reports nothing
    assert chart.console_errors == []


def test_an_empty_chart_whose_daemon_cannot_reach_binance_says_so_at_once(
    tmp_path: Path, browser: Browser
) -> None:
    with replayed_day(tmp_path) as (m, _):
        # offline from the start: the daemon is up, its store empty, Binance never answers
        _lose_binance(m)
        assert m.stop_serve() == 0
        m.start_serve()
        with chart_page(browser, m.http_url) as chart:
            chart.open(BASE)
            chart.wait_until(f"() => {TC}.state() === 'waiting'")
            assert chart.call(f"() => {TC}.badge()") == "waiting: Binance unreachable"
            state = chart.page.locator("#state")
            assert state.get_attribute("aria-label") == "connection: waiting; Binance unreachable"
            assert "not connected to Binance" in (state.get_attribute("title") or "")
            assert chart.call(f"() => {TC}.legend()") == (
                f"{BASE} — no candles yet: waiting for Binance: the daemon is not connected to it"
            )
            assert chart.page.locator("#legend").inner_text().endswith("not connected to it")
            assert chart.call("() => document.getElementById('announce').textContent") == (
                "connection: waiting; Binance unreachable"
            )
            assert chart.call(WHOLE)
            _no_errors(chart)
            chart.screenshot("chart-offline-empty")


def test_a_chart_whose_source_is_gone_says_stale_at_load_the_cause_first(
    tmp_path: Path, browser: Browser
) -> None:
    with (
        replayed_day(tmp_path) as (m, bars),
        chart_page(browser, m.http_url, timing=NO_HEARTBEAT) as chart,
    ):
        chart.page.clock.install()  # it runs as the real one until the test moves it
        m.resume_replay()
        chart.open(BASE)
        chart.wait_until(f"(t) => {TC}.lastClosed() === t", bars[-1].time)
        _lose_binance(m)
        # a page opened now holds the stored bars, and none will come: said at once, not
        # after 90 s of a green `live`
        chart.open(BASE)
        chart.wait_until(f"() => {TC}.state() === 'stale'")
        assert chart.call(f"() => {TC}.badge()") == "stale: Binance unreachable"
        assert chart.call(f"() => {TC}.data({BASE!r}).length") > 0
        chart.call(WATCH)
        # the age counts up once it is stale, after the cause; in the aria-hidden detail only
        chart.page.clock.run_for(99_000)
        chart.wait_until(f"() => {TC}.badge() === 'stale: Binance unreachable · 1 min 39 s'")
        assert chart.call(WHOLE)  # 1280 px wide: the whole text shows
        assert chart.call("() => window.said") == []
        changes = chart.call("() => window.badgeChanges")
        assert changes and all(changes), changes
        assert chart.page.locator("#state").get_attribute("aria-label") == (
            "connection: stale; Binance unreachable"
        )
        _no_errors(chart)
        chart.screenshot("chart-offline-stale")


def test_a_live_chart_whose_source_goes_away_says_so_within_seconds(
    tmp_path: Path, browser: Browser
) -> None:
    """A trader's review: Binance gone, the badge stayed a green ``live`` for 94 s (the page
    asked /readyz only after 90 s without a message). It polls ``/healthz`` now."""
    with live_chart(tmp_path, browser, newest=True) as (m, chart, _):
        _lose_binance(m)
        # within seconds (the page asks every 3 s), not after 90 s of a green `live`
        chart.page.wait_for_function(f"() => {TC}.state() === 'stale'", timeout=12_000)
        assert chart.call(f"() => {TC}.badge()") == "stale: Binance unreachable"
        # asked for its own series' connection (docs/api.md)
        asked = f"/healthz?series_id={quote(BASE, safe='')}"
        assert any(url.endswith(asked) for url in chart.requests), chart.requests
        assert not any("/readyz" in url for url in chart.requests)  # kept off public proxies
        _no_errors(chart)
        chart.screenshot("chart-source-gone")
