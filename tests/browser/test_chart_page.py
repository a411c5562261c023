"""The chart page (``GET /``) in headless Chromium against a real ``tradecanvas serve`` fed by
``tradecanvas replay`` of real Binance candles (docs/chart.md). The tests read the chart's
own data (``window.tradecanvasChart``), never pixels, and wait on it, never on a sleep."""

from __future__ import annotations

from pathlib import Path

import attrs
import pytest
import trio
from playwright.sync_api import Browser

from tests.browser.rig import (
    BASE,
    FIVE,
    HISTORY,
    HOUR,
    STREAMED,
    WEEK_5M,
    Bar,
    ChartPage,
    chart_page,
    live_chart,
    read_bars,
    replayed_day,
    wait_for_line,
)
from tests.cli_rig import cli_env, run_cli
from tests.conftest import binance_data_dir, flat_minutes
from tradecanvas.pipeline.derive import aggregate
from tradecanvas.store.sqlite import CandleStore

pytestmark = [pytest.mark.browser, pytest.mark.e2e]


def _last_closed_is(chart: ChartPage, time_: int) -> None:
    chart.wait_until("(t) => window.tradecanvasChart.lastClosed() === t", time_)


@pytest.mark.parametrize("publish", ["0", "1"])
def test_the_page_shows_the_replayed_candles_live_and_as_history(
    tmp_path: Path, browser: Browser, publish: str
) -> None:
    with replayed_day(tmp_path, publish=publish) as (m, bars):
        with chart_page(browser, m.http_url) as chart:
            # the store is empty: the page subscribes, then the market opens
            chart.open(BASE)
            chart.wait_live()
            assert chart.bars(BASE) == []
            m.resume_replay()
            _last_closed_is(chart, bars[-1].time)
            # every bar arrived over /ws/market (the backfilled day, then each close live)
            # and equals Binance's
            assert chart.bars(BASE) == bars
            chosen = next(b for b in bars if b.time == 1751760060)  # 2025-07-06 00:01 UTC
            assert chosen == Bar(1751760060, 108166.9, 108167.0, 108166.9, 108167.0, 4.633)
            assert chart.console_errors == []
            assert all(url.startswith(m.http_url + "/") for url in chart.requests), chart.requests

        with chart_page(browser, m.http_url) as chart:
            # a fresh page: the newest 1000 bars from HTTP, equal to the CSV's
            chart.open(BASE)
            chart.wait_live()
            assert chart.bars(BASE) == bars[-1000:]
            # a close published after the page loaded is appended
            nxt = attrs.evolve(bars[-1], time=bars[-1].time + 60, close=bars[-1].close + 1.5)
            nxt = attrs.evolve(nxt, high=max(nxt.high, nxt.close))
            m.ingest(BASE, nxt)
            _last_closed_is(chart, nxt.time)
            assert chart.bars(BASE)[-2:] == [bars[-1], nxt]
            # scrolled back to the oldest bar, the page loads the rest of the day
            chart.call("() => window.tradecanvasChart.chart.timeScale().scrollToPosition(-2000)")
            chart.wait_until(
                "(n) => window.tradecanvasChart.data(window.tradecanvasChart.seriesId()).length"
                " === n",
                len(bars) + 1,
            )
            assert chart.bars(BASE) == [*bars, nxt]
            assert chart.console_errors == []
            chart.screenshot(f"chart-1m-publish{publish}")


def test_the_timeframe_switcher_shows_binance_5m_bars(tmp_path: Path, browser: Browser) -> None:
    five = {b.time: b for b in read_bars(binance_data_dir() / WEEK_5M)}
    with live_chart(tmp_path, browser, newest=True) as (_, chart, _):
        chart.page.get_by_role("button", name="5m", exact=True).click()
        chart.wait_until(f"() => window.tradecanvasChart.seriesId() === {FIVE!r}")
        chart.wait_until("() => window.tradecanvasChart.ready()")
        chart.wait_live()
        shown = chart.bars(FIVE)
        assert len(shown) == (HISTORY + STREAMED) // 5
        assert shown == [five[b.time] for b in shown]
        # the address stays readable
        assert chart.page.url.endswith("?series=binance:futures:BTC/USDT:5m")
        # the close as Binance wrote it (tick 0.1: one decimal)
        assert chart.call("() => document.title") == f"{shown[-1].close} · {FIVE} — tradecanvas"
        assert chart.console_errors == []
        chart.screenshot("chart-5m")
        # 1h: 24 bars, fewer than the width holds at the usual spacing, are fitted to it
        # (not left as a sliver at the right edge)
        chart.page.get_by_role("button", name="1h", exact=True).click()
        chart.wait_until(f"() => window.tradecanvasChart.seriesId() === {HOUR!r}")
        chart.wait_until("() => window.tradecanvasChart.ready()")
        hours = len(chart.bars(HOUR))
        assert 20 <= hours <= 25
        chart.wait_until(
            "(n) => { const r = window.tradecanvasChart.chart.timeScale()"
            ".getVisibleLogicalRange(); return r !== null && r.from <= 0 && r.to >= n - 1; }",
            hours,
        )
        spacing = chart.call("() => window.tradecanvasChart.chart.timeScale().options().barSpacing")
        assert spacing > 6
        # back to 5m: the usual spacing again, the newest bars in view
        chart.page.get_by_role("button", name="5m", exact=True).click()
        chart.wait_until(f"() => window.tradecanvasChart.seriesId() === {FIVE!r}")
        chart.wait_until("() => window.tradecanvasChart.ready()")
        assert (
            chart.call("() => window.tradecanvasChart.chart.timeScale().options().barSpacing") == 6
        )
        chart.screenshot("chart-1h")


def test_an_exchange_hole_is_shaded_and_a_rebuild_redraws_the_revised_bar(
    tmp_path: Path, browser: Browser
) -> None:
    # the minutes 00:12..00:16 of the second day: the 5m bars of 00:10 and 00:15 incomplete
    hole_at, hole_len = HISTORY + 12, 5
    with replayed_day(tmp_path, "--exchange-hole", f"{hole_at}:{hole_len}") as (m, bars):
        missing = [b.time for b in bars[hole_at : hole_at + hole_len]]
        present = [b for b in bars if b.time not in missing]
        with chart_page(browser, m.http_url) as chart:
            chart.open(BASE)
            chart.wait_live()
            m.resume_replay()
            _last_closed_is(chart, bars[-1].time)
            assert chart.bars(BASE) == present
            # live: the `gap` message (or event) shaded the hole
            chart.wait_until(
                "([sid, times]) => times.every((t) => window.tradecanvasChart.gaps(sid)"
                ".includes(t))",
                [BASE, missing],
            )
            assert chart.console_errors == []

        with chart_page(browser, m.http_url) as chart:
            # a fresh page shades the hole from the history and the event log
            chart.open(FIVE)
            chart.wait_live()
            partial = [missing[0] - 120, missing[0] + 180]
            assert chart.call(f"() => window.tradecanvasChart.gaps({FIVE!r})") == partial
            # the bars are there, shaded, and the legend says why
            held = {b.time for b in chart.bars(FIVE)}
            assert set(partial) <= held
            legend = chart.call("(t) => window.tradecanvasChart.legend(t)", partial[0])
            assert legend.endswith("· incomplete: some of its minutes are missing"), legend
            # the oldest bar held is the series' first (a day and a half of 5m: all held)
            first = min(held)
            legend = chart.call("(t) => window.tradecanvasChart.legend(t)", first)
            assert legend.endswith("· the first stored bar"), legend
            chart.page.get_by_role("button", name="1m", exact=True).click()
            chart.wait_until(f"() => window.tradecanvasChart.seriesId() === {BASE!r}")
            chart.wait_live()
            assert chart.call(f"() => window.tradecanvasChart.gaps({BASE!r})") == missing
            # the legend over a shaded hole says so; over a bar, its values
            over_hole = chart.call("(t) => window.tradecanvasChart.legend(t)", missing[0])
            assert over_hole.endswith("UTC  no candle: a hole in the series"), over_hole
            before = present[hole_at - 1]
            over_bar = chart.call("(t) => window.tradecanvasChart.legend(t)", before.time)
            assert f"C {before.close:.1f}" in over_bar and "hole" not in over_bar, over_bar

            # a stored bar is revised (the HTTP write path): factor.rebuild redraws it
            old = bars[-5]
            revised = attrs.evolve(old, high=old.high + 50, close=old.high + 50)
            m.ingest(BASE, revised)
            chart.wait_until(
                "([sid, t, close]) => window.tradecanvasChart.data(sid)"
                ".some((b) => b.time === t && b.close === close)",
                [BASE, revised.time, revised.close],
            )
            assert chart.call("() => window.tradecanvasChart.rebuilds()") == [
                {"reason": "revision", "from_time": revised.time, "to_time": revised.time}
            ]
            expected = [revised if b.time == old.time else b for b in present]
            assert chart.bars(BASE) == expected[-1000:]
            assert chart.bars(BASE) == m.stored(BASE)[-1000:]
            assert chart.console_errors == []
            chart.screenshot("chart-gap")


def test_scrolling_back_over_a_hole_keeps_the_bars_in_view(
    tmp_path: Path, browser: Browser
) -> None:
    """A page opened on the newest 1,000 of 1,440 stored minutes; the page before them has a
    hole of 30 at the exchange. Loading it keeps the view on the same bars: the hole's
    shaded slots are points of the time scale too, and the view moved back by their number
    (90 minutes of a 1m chart for a 90-minute hole, as a user saw)."""
    hole_at, hole_len = 150, 30
    with live_chart(
        tmp_path, browser, "--exchange-hole", f"{hole_at}:{hole_len}", streamed=False
    ) as (m, chart, bars):
        missing = {b.time for b in bars[hole_at : hole_at + hole_len]}
        present = [b for b in bars if b.time not in missing]
        m.resume_replay()
        _last_closed_is(chart, bars[-1].time)
        chart.open(BASE)  # again: the newest 1,000 from the store, the rest older
        chart.wait_live()
        assert chart.bars(BASE) == present[-1000:]
        in_view = chart.call("() => window.tradecanvasChart.visibleTimes()")
        asked_before = len(chart.requests)
        chart.call("() => window.tradecanvasChart.loadOlder()")
        assert chart.bars(BASE) == present == m.stored(BASE)
        # one request for the page, whatever the holes in it (it walked them in windows)
        pages = [u for u in chart.requests[asked_before:] if "/api/market/candles" in u]
        assert len(pages) == 1 and f"before={present[-1000].time}" in pages[0], pages
        assert chart.call("() => window.tradecanvasChart.visibleTimes()") == in_view
        assert sorted(missing) == chart.call(f"() => window.tradecanvasChart.gaps({BASE!r})")
        assert chart.console_errors == []


def test_the_page_recovers_after_the_daemon_restarts(tmp_path: Path, browser: Browser) -> None:
    with live_chart(tmp_path, browser, newest=True) as (m, chart, bars):
        events_before = chart.call("() => window.tradecanvasChart.lastEventId()")
        assert m.stop_serve() == 0
        chart.wait_until("() => window.tradecanvasChart.state() === 'reconnecting'")
        assert "reconnecting" in chart.page.locator("#state").inner_text()
        # refused a few times in a row (0.25 + 0.5 + 1 + 2 s of backoff): the badge says the
        # daemon stopped at every attempt; no notice blames the page's origin (the review:
        # it did, after a plain stop)
        chart.wait_until("() => /retry [4-9]/.test(document.querySelector('#state').innerText)")
        assert "daemon stopped" in chart.page.locator("#state").inner_text()
        assert chart.call("() => window.tradecanvasChart.notice()") == ""
        errors_before_restart = len(chart.console_errors)
        # while the page is cut off, the restarted daemon stores two more closes
        m.start_serve()
        later = [
            attrs.evolve(bars[-1], time=bars[-1].time + 60 * i, volume=float(i)) for i in (1, 2)
        ]
        for bar in later:
            m.ingest(BASE, bar)
        chart.wait_live()
        # connected again: the notice is gone
        assert chart.call("() => window.tradecanvasChart.notice()") == ""
        assert chart.page.locator("#notice").is_hidden()
        _last_closed_is(chart, later[-1].time)
        # resumed from its cursors: nothing missed, nothing doubled
        shown = chart.bars(BASE)
        assert len(shown) >= 1000 + 2
        assert shown == m.stored(BASE)[-len(shown) :]
        assert chart.bars(BASE)[-3:] == [bars[-1], *later]
        assert chart.call("() => window.tradecanvasChart.lastEventId()") >= events_before
        # the only console errors are the browser's own reports of refused reconnects
        assert all("WebSocket connection to" in e for e in chart.console_errors), (
            chart.console_errors
        )
        assert len(chart.console_errors) >= errors_before_restart
        chart.screenshot("chart-after-restart")


def test_the_badge_says_stale_when_no_market_data_comes(tmp_path: Path, browser: Browser) -> None:
    # the page's clock is Playwright's: minutes of silence without waiting for them
    with live_chart(tmp_path, browser, streamed=False, clock=True) as (m, chart, bars):
        # the replay is paused: connected to the daemon, which is connected upstream,
        # but no market data; after 90 s the badge says so, and not that the daemon
        # lost the exchange
        chart.page.clock.fast_forward(80_000)
        # timers 80 s late look like a page that slept: it checks its connection (syncing),
        # and is live again, the age still counted from the last market message
        chart.wait_live()
        assert chart.call("() => window.tradecanvasChart.badge()") == "live"
        chart.page.clock.fast_forward(15_000)
        chart.wait_until("() => window.tradecanvasChart.state() === 'stale'")
        badge = chart.call("() => window.tradecanvasChart.badge()")
        assert badge.startswith("stale (no data for 1 min 3"), badge
        assert "unreachable" not in badge
        # market data again: live
        m.resume_replay()
        _last_closed_is(chart, bars[-1].time)
        chart.wait_live()
        assert chart.call("() => window.tradecanvasChart.badge()") == "live"
        # the exchange goes away: the daemon's upstream is down, and the badge says it
        m.replay.kill()
        m.replay.wait(timeout=30)
        chart.page.clock.fast_forward(95_000)
        # the cause first (a badge too narrow for its text cuts the end off), then the age
        chart.wait_until(
            "() => window.tradecanvasChart.badge().startsWith('stale: Binance unreachable · 1 min')"
        )
        assert chart.call("() => window.tradecanvasChart.state()") == "stale"
        assert chart.console_errors == []
        chart.screenshot("chart-stale")


def test_a_page_origin_outside_the_allow_list_gets_no_stream(
    tmp_path: Path, browser: Browser
) -> None:
    with replayed_day(
        tmp_path, start_at=None, TRADE_CANVAS_WS_ALLOWED_ORIGINS="https://charts.example"
    ) as (m, _):
        with chart_page(browser, m.http_url) as chart:
            # the page and the HTTP API load; its /ws/market upgrade is refused (403)
            chart.open(BASE)
            chart.wait_until(
                "() => document.querySelector('#notice').textContent"
                ".includes('TRADE_CANVAS_WS_ALLOWED_ORIGINS')"
            )
            assert chart.call("() => window.tradecanvasChart.state()") == "reconnecting"
            assert chart.console_errors
            assert all("WebSocket connection to" in e for e in chart.console_errors)
        refused = f"403 for Origin '{m.http_url}'"
        assert refused in (tmp_path / "serve-1.log").read_text()


def test_a_bar_marked_incomplete_is_shaded_without_its_event(
    tmp_path: Path, browser: Browser
) -> None:
    """The event log keeps 7 days; a derived bar's `complete: false` on the HTTP read keeps
    its shading after that. Here a store holds such a bar and no event at all."""
    db = tmp_path / "market.sqlite3"
    minutes = [m for m in flat_minutes(1_751_760_000, 10) if m.candle_time != 1_751_760_120]

    async def fill() -> None:
        store = await CandleStore.open(db)
        try:
            await store.upsert(BASE, minutes, "ws")
            whole = aggregate(1_751_760_300, minutes[4:], None)
            part = aggregate(1_751_760_000, minutes[:4], None)
            await store.upsert(FIVE, [part], "derived", complete=False)
            await store.upsert(FIVE, [whole], "derived")
        finally:
            await store.aclose()

    trio.run(fill)
    env = cli_env(
        TRADE_CANVAS_DB_PATH=str(db),
        TRADE_CANVAS_DERIVED_TIMEFRAMES="5m",
        TRADE_CANVAS_BINANCE_FUTURES_WS_URL="ws://127.0.0.1:9",  # no exchange here
        TRADE_CANVAS_BINANCE_FUTURES_REST_URL="http://127.0.0.1:9",
    )
    with run_cli(["serve"], env, tmp_path / "serve.log") as serve:
        origin = wait_for_line(tmp_path / "serve.log", r"ready ws=\S+ http=(\S+)", serve).group(1)
        with chart_page(browser, origin) as chart:
            chart.open(FIVE)
            chart.wait_until("() => window.tradecanvasChart.ready()")
            assert [b.time for b in chart.bars(FIVE)] == [1_751_760_000, 1_751_760_300]
            assert chart.call(f"() => window.tradecanvasChart.gaps({FIVE!r})") == [1_751_760_000]
            legend = chart.call("(t) => window.tradecanvasChart.legend(t)", 1_751_760_000)
            assert "incomplete: some of its minutes are missing" in legend, legend


def test_a_reload_asks_the_daemon_for_none_of_the_pages_files(
    tmp_path: Path, browser: Browser
) -> None:
    """Every file was revalidated on a reload (a 304 each: 13 requests before the chart
    could draw, over HTTP/1.1's six connections). The page names them by version now, and
    the browser takes them from its cache without asking; the page itself, the series list,
    the events and the candles are asked for again, and the chart is live as before."""
    with live_chart(tmp_path, browser) as (_, chart, _):
        cdp = chart.page.context.new_cdp_session(chart.page)
        cdp.send("Network.enable")
        sent: dict[str, str] = {}
        from_cache: set[str] = set()
        cdp.on(
            "Network.requestWillBeSent",
            lambda e: sent.update({e["requestId"]: e["request"]["url"]}),
        )
        cdp.on("Network.requestServedFromCache", lambda e: from_cache.add(e["requestId"]))
        chart.page.reload()
        chart.wait_live()
        assets = {i: url for i, url in sent.items() if "/assets/" in url}
        assert len(assets) >= 12 and all("?v=" in url for url in assets.values())
        assert set(assets) <= from_cache, [u for i, u in assets.items() if i not in from_cache]
        asked = {
            url.split("?")[0].rsplit("/", 1)[-1] for i, url in sent.items() if i not in from_cache
        }
        assert {"series", "candles"} <= asked
        assert chart.console_errors == []


def test_a_page_whose_origin_the_daemon_refuses_says_so(tmp_path: Path, browser: Browser) -> None:
    """Served from an origin not in TRADE_CANVAS_WS_ALLOWED_ORIGINS (a host name the daemon
    was not told of, a proxy's): the history loads over HTTP, the socket is refused with
    403. The badge said `cannot reach the daemon` though the same daemon had just answered;
    now it says the daemon refused the socket, and the notice names the setting."""
    with (
        replayed_day(tmp_path, TRADE_CANVAS_WS_ALLOWED_ORIGINS="http://charts.example") as (m, _),
        chart_page(browser, m.http_url) as chart,
    ):
        chart.page.goto(m.http_url)
        chart.wait_until(
            "() => /refused by the daemon/.test(document.querySelector('#state').innerText)"
        )
        notice = chart.call("() => window.tradecanvasChart.notice()")
        assert "origin is not allowed (TRADE_CANVAS_WS_ALLOWED_ORIGINS)" in notice
        assert "cannot reach" not in chart.page.locator("#state").inner_text()
