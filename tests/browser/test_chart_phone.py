"""The chart page on a phone over a poor link (a review of the page, 2026-12-05): a connection
that dies without a word, a page frozen and woken, the device offline and back, the layout
of a small screen upright and on its side, reading a bar by touch. Headless Chromium with a
phone's viewport and touch, against a real ``tradecanvas serve`` fed by ``tradecanvas
replay``, through a TCP proxy that fails like a phone's network (``tcp_proxy``). The page's
connection timings are lowered through ``window.tradecanvasTiming``; the tests wait on the
page's own state, never on a sleep."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import attrs
import pytest
from playwright.sync_api import Browser

from tests.browser.rig import (
    BASE,
    TC,
    Bar,
    ChartPage,
    Market,
    chart_page,
    live_chart,
    replayed_day,
)
from tests.browser.tcp_proxy import TcpProxy

pytestmark = [pytest.mark.browser, pytest.mark.e2e]

UPRIGHT: Final[dict[str, Any]] = {  # Playwright's "iPhone SE"
    "viewport": {"width": 320, "height": 568},
    "device_scale_factor": 2,
    "is_mobile": True,
    "has_touch": True,
}
ON_ITS_SIDE: Final = UPRIGHT | {"viewport": {"width": 568, "height": 320}}
# a dead connection is found within a second or two (the page's own: 15 s + 10 s)
QUICK: Final = {"heartbeatMs": 300, "pongTimeoutMs": 1000, "tickMs": 100}
# every badge text shown, in order (a state may last a few milliseconds)
RECORD_BADGES: Final = """() => {
  window.badges = [];
  const el = document.getElementById('state');
  const seen = () => window.badges.push([el.textContent, window.tradecanvasChart.lastClosed()]);
  new MutationObserver(seen).observe(el, {childList: true, characterData: true, subtree: true});
}"""


@contextmanager
def proxied_phone(
    tmp_path: Path, browser: Browser, timing: dict[str, int], *, clock: bool = False
) -> Iterator[tuple[Market, TcpProxy, ChartPage, list[Bar]]]:
    """The daemon serving the replayed day, and a phone showing BASE live through the proxy
    (with ``clock``, the page's clock is Playwright's)."""
    with replayed_day(tmp_path) as (m, bars), TcpProxy(m.http_port) as proxy:
        m.resume_replay()
        with chart_page(browser, proxy.origin, timing=timing, **UPRIGHT) as chart:
            if clock:
                chart.page.clock.install()
            chart.open(BASE)
            chart.wait_live()
            chart.wait_until(f"(t) => {TC}.lastClosed() === t", bars[-1].time)
            chart.call(RECORD_BADGES)
            yield m, proxy, chart, bars


@contextmanager
def live_phone(
    tmp_path: Path, browser: Browser, device: dict[str, Any]
) -> Iterator[tuple[Market, ChartPage, list[Bar]]]:
    """The daemon serving the replayed day, and ``device`` showing BASE live, every bar in."""
    with live_chart(tmp_path, browser, newest=True, device=device) as (m, chart, bars):
        yield m, chart, bars


def _next_bar(after: Bar, close_step: float = 1.0) -> Bar:
    bar = attrs.evolve(after, time=after.time + 60, close=after.close + close_step)
    return attrs.evolve(bar, high=max(bar.high, bar.close), low=min(bar.low, bar.close))


def _resumed_from_its_cursors(m: Market, chart: ChartPage, newest: Bar) -> None:
    chart.wait_live()
    chart.wait_until(f"(t) => {TC}.lastClosed() === t", newest.time)
    shown = chart.bars(BASE)
    assert shown == m.stored(BASE)[-len(shown) :]
    assert shown[-1] == newest


def test_a_connection_that_died_silently_is_found_and_resumed(
    tmp_path: Path, browser: Browser
) -> None:
    with proxied_phone(tmp_path, browser, QUICK) as (m, proxy, chart, bars):
        proxy.blackhole()  # the phone changed networks: nothing passes, nothing says so
        newer = _next_bar(bars[-1])
        m.ingest(BASE, newer)  # stored meanwhile: the page gets it once it has reconnected
        chart.wait_until(
            "() => window.badges.some(([b]) => b.startsWith('reconnecting: connection lost'))"
        )
        _resumed_from_its_cursors(m, chart, newer)
        assert chart.call(f"{TC}.errors()") == []


def _checked_before_live(m: Market, chart: ChartPage, newer: Bar) -> None:
    """After a wake-up: the page said it was checking, then that the connection was lost,
    and was live only once it held ``newer``, stored while it slept."""
    _resumed_from_its_cursors(m, chart, newer)
    shown = chart.call("() => window.badges.splice(0)")
    first_live = next(i for i, (text, _) in enumerate(shown) if text == "live")
    texts = [text for text, _ in shown[:first_live]]
    assert texts[0] == "syncing (checking after a pause)", shown
    assert any(t.startswith("reconnecting: connection lost") for t in texts), shown
    assert shown[first_live][1] == newer.time


def test_a_page_woken_from_sleep_is_not_live_until_it_has_checked(
    tmp_path: Path, browser: Browser
) -> None:
    """A frozen page (a phone asleep) wakes with its timers a minute late and its socket
    maybe dead. (CDP's Page.setWebLifecycleState does not freeze a shown page in headless
    Chromium, so the sleep is the page's clock jumping, and the thaw its `resume` event.)"""
    # no heartbeat within the test: only the wake-up finds the dead connection
    timing = {"heartbeatMs": 600_000, "pongTimeoutMs": 1000, "tickMs": 100}
    with proxied_phone(tmp_path, browser, timing, clock=True) as (m, proxy, chart, bars):
        proxy.blackhole()  # the phone slept; its network went away meanwhile
        newer = _next_bar(bars[-1])
        m.ingest(BASE, newer)
        chart.page.clock.fast_forward(60_000)
        _checked_before_live(m, chart, newer)
        # again, woken by the browser's `resume` (a frozen tab thawed)
        proxy.blackhole()
        newer = _next_bar(newer)
        m.ingest(BASE, newer)
        chart.call("() => document.dispatchEvent(new Event('resume'))")
        _checked_before_live(m, chart, newer)


def test_offline_says_so_and_reconnects_as_soon_as_the_network_is_back(
    tmp_path: Path, browser: Browser
) -> None:
    # after the first refusal the next attempt would be minutes away: only `online` helps
    timing = QUICK | {"reconnectMinMs": 600_000, "reconnectMaxMs": 600_000}
    with proxied_phone(tmp_path, browser, timing) as (m, proxy, chart, bars):
        chart.page.context.set_offline(True)
        proxy.refuse()
        chart.wait_until(f"() => {TC}.state() === 'offline'")
        assert chart.call(f"() => {TC}.badge()").startswith("offline: no network · retry ")
        assert chart.call(f"() => {TC}.notice()") == ""  # no operator's hint for a phone
        newer = _next_bar(bars[-1])
        m.ingest(BASE, newer)
        proxy.refuse(False)
        chart.page.context.set_offline(False)
        _resumed_from_its_cursors(m, chart, newer)


# the badge and the tab's title just after the page's own `offline` handler ran (this
# listener, added after the page's scripts, runs after theirs; the title is written by a
# MutationObserver, whose callback was queued before this microtask)
AFTER_OFFLINE: Final = """() => {
  window.afterOffline = null;
  window.addEventListener('offline', () => {
    const badge = window.tradecanvasChart.badge();
    queueMicrotask(() => { window.afterOffline = [badge, document.title]; });
  }, {once: true});
}"""


def test_the_badge_doubts_at_once_when_the_network_goes(tmp_path: Path, browser: Browser) -> None:
    """A trader review (2026-12-05): the badge said `live` for 10 s after the browser said the
    network was gone (an 8 s outage never showed). It says `offline` at once; a socket that
    still works (a daemon on this machine) answers the check and the page is `live` again
    without reconnecting; one that does not is dropped and retried."""
    with proxied_phone(tmp_path, browser, QUICK) as (m, proxy, chart, bars):
        # the event alone (navigator.onLine still true, the socket fine): the check's pong
        # comes, and the page is live again on the same connection
        chart.call(AFTER_OFFLINE)
        chart.call("() => window.dispatchEvent(new Event('offline'))")
        chart.wait_until("() => window.afterOffline !== null")
        badge, title = chart.call("() => window.afterOffline")
        assert badge == "offline: no network · checking", badge
        assert title.startswith("⚠ offline · "), title
        chart.wait_live()
        shown = [text for text, _ in chart.call("() => window.badges.splice(0)")]
        assert shown == ["offline: no network · checking", "live"], shown
        # the browser offline, nothing passing: `offline` at once, in the badge and the title
        chart.call(AFTER_OFFLINE)
        proxy.blackhole()
        chart.page.context.set_offline(True)
        chart.wait_until("() => window.afterOffline !== null")
        badge, title = chart.call("() => window.afterOffline")
        assert badge == "offline: no network · checking", badge
        assert title.startswith("⚠ offline · "), title
        # a thawed page (or a late tick) checks again meanwhile: still `offline`, not
        # `syncing`, while the browser says there is no network (code review)
        chart.call("() => document.dispatchEvent(new Event('resume'))")
        assert chart.call(f"() => {TC}.badge()") == "offline: no network · checking"
        # the check unanswered: dropped, retried, still `offline` until the network is back
        chart.wait_until(f"() => {TC}.badge().startsWith('offline: no network · retry ')")
        newer = _next_bar(bars[-1])
        m.ingest(BASE, newer)
        chart.page.context.set_offline(False)
        _resumed_from_its_cursors(m, chart, newer)
        shown = [text for text, _ in chart.call("() => window.badges.splice(0)")]
        first_sync = shown.index("syncing")
        assert shown[0] == "offline: no network · checking", shown
        assert all(t.startswith("offline: ") for t in shown[:first_sync]), shown
        assert shown[first_sync:] == ["syncing", "live"], shown


def _layout(chart: ChartPage) -> Any:
    return chart.call(
        """() => {
      const box = (el) => { const b = el.getBoundingClientRect();
        return {left: b.left, top: b.top, right: b.right, bottom: b.bottom, width: b.width,
                height: b.height}; };
      const $ = (id) => document.getElementById(id);
      return {
        width: innerWidth, height: innerHeight,
        scrollWidth: document.documentElement.scrollWidth,
        chart: box($('chart')), header: box(document.querySelector('header')),
        series: box($('series')), state: box($('state')),
        seriesFont: parseFloat(getComputedStyle($('series')).fontSize),
        buttons: [...document.querySelectorAll('#timeframes button')].map(box),
        // a group split over two lines has two boxes
        splitGroups: [...document.querySelectorAll('#legend span')]
          .filter((s) => s.getClientRects().length > 1).map((s) => s.textContent),
        groups: document.querySelectorAll('#legend span').length,
      };
    }"""
    )


@pytest.mark.parametrize(("device", "most_header"), [(UPRIGHT, 150), (ON_ITS_SIDE, 90)])
def test_a_phone_shows_the_controls_within_reach_and_the_whole_chart(
    tmp_path: Path, browser: Browser, device: dict[str, Any], most_header: int
) -> None:
    with live_phone(tmp_path, browser, device) as (_, chart, _):
        # the longest a badge says: cut short on its line, never a line of its own
        chart.call(
            "() => { document.getElementById('state').textContent ="
            " 'reconnecting: connection lost: no answer in 10 s · retry 4 in 2 s'; }"
        )
        got = _layout(chart)
        width, height = got["width"], got["height"]
        assert got["scrollWidth"] <= width
        # the chart, its time axis included, is on the screen
        assert got["chart"]["top"] >= 0 and got["chart"]["bottom"] <= height, got
        assert got["chart"]["height"] >= 140, got
        assert got["header"]["height"] <= most_header, got
        # finger-sized timeframes, all on the screen; a menu iOS does not zoom into
        assert len(got["buttons"]) == 3
        for b in got["buttons"]:
            assert b["width"] >= 44 and b["height"] >= 40, got["buttons"]
            assert b["left"] >= 0 and b["right"] <= width
        assert got["seriesFont"] >= 16
        state, series = got["state"], got["series"]
        assert state["right"] <= width and state["bottom"] <= got["header"]["bottom"]
        assert state["top"] < series["bottom"] and series["top"] < state["bottom"], got
        # the legend wraps between its groups, never between a label and its value
        assert got["groups"] >= 6 and got["splitGroups"] == [], got
        chart.screenshot(f"chart-phone-{width}x{height}")


def test_a_finger_reads_a_bar_while_held_and_the_newest_once_lifted(
    tmp_path: Path, browser: Browser
) -> None:
    with live_phone(tmp_path, browser, UPRIGHT) as (m, chart, bars):
        past = bars[-10]
        box = chart.page.locator("#chart").bounding_box()
        assert box is not None
        x = box["x"] + chart.call(f"(t) => {TC}.chart.timeScale().timeToCoordinate(t)", past.time)
        y = box["y"] + box["height"] / 2
        cdp = chart.page.context.new_cdp_session(chart.page)

        def touch(kind: str, *points: tuple[float, float]) -> None:
            where = [{"x": px, "y": py, "id": 0} for px, py in points]
            cdp.send("Input.dispatchTouchEvent", {"type": kind, "touchPoints": where})

        shown = "document.getElementById('legend').textContent"
        legend = f"() => {shown}"
        touch("touchStart", (x, y))
        chart.wait_until(f"(t) => {shown} === {TC}.legend(t)", past.time)
        # held: new bars move the chart under the finger, the legend stays on its bar
        newer = [_next_bar(bars[-1], 1.0)]
        newer.append(_next_bar(newer[0], 2.0))
        for bar in newer:
            m.ingest(BASE, bar)
        chart.wait_until(f"(t) => {TC}.lastClosed() === t", newer[-1].time)
        assert chart.call(legend) == chart.call(f"(t) => {TC}.legend(t)", past.time)
        # lifted: the newest bar, and it follows the bars that come
        touch("touchEnd")
        chart.wait_until(f"() => {shown} === {TC}.legend()")
        later = _next_bar(newer[-1], 3.0)
        m.ingest(BASE, later)
        chart.wait_until(f"(t) => {TC}.lastClosed() === t", later.time)
        chart.wait_until(f"() => {shown} === {TC}.legend()")
        close = chart.call(f"(x) => {TC}.axisPrice(x)", later.close)  # as the axis writes it
        assert f"C {close}" in chart.call(legend)
        # the badge's explanation is a tap away (a phone shows no tooltip)
        assert chart.page.locator("#why").is_hidden()
        chart.page.locator("#state").tap()
        why = chart.page.locator("#why")
        assert why.is_visible() and why.inner_text().startswith("live: Connected")
        chart.page.locator("#state").tap()
        assert why.is_hidden()
        assert chart.console_errors == []


# every interval Binance has (with 1m): fifteen timeframe buttons
EVERY_BINANCE_TIMEFRAME: Final = "3m,5m,15m,30m,1h,2h,4h,6h,8h,12h,1d,3d,1w,1M"


@pytest.mark.parametrize(("device", "most_header"), [(ON_ITS_SIDE, 95), (UPRIGHT, 160)])
def test_fifteen_timeframes_stay_on_one_line_and_the_chart_on_the_screen(
    tmp_path: Path, browser: Browser, device: dict[str, Any], most_header: int
) -> None:
    """A trader review (2026-12-05): on its side with all fifteen timeframes the buttons took
    two lines and the badge a third, the time axis was below the screen and the page
    scrolled (upright, 6 px too tall). The timeframes are a strip that scrolls sideways,
    the chosen one in view, each reachable from the keyboard."""
    with live_chart(
        tmp_path,
        browser,
        series="binance:futures:BTC/USDT:1d",
        device=device,
        serve_env={"TRADE_CANVAS_DERIVED_TIMEFRAMES": EVERY_BINANCE_TIMEFRAME},
    ) as (_, chart, _):
        got = _layout(chart)
        width, height = got["width"], got["height"]
        assert chart.call("() => document.documentElement.scrollHeight") <= height, got
        assert got["scrollWidth"] <= width
        assert got["chart"]["top"] >= 0 and got["chart"]["bottom"] <= height, got
        assert got["chart"]["height"] >= 140, got
        assert got["header"]["height"] <= most_header, got
        buttons = got["buttons"]
        assert len(buttons) == 15
        assert {b["top"] for b in buttons} == {buttons[0]["top"]}, buttons  # one line
        for b in buttons:
            assert b["width"] >= 44 and b["height"] >= 40, buttons
        state, series = got["state"], got["series"]
        assert state["right"] <= width and state["top"] < series["bottom"], got
        if device is ON_ITS_SIDE:  # the menu, the timeframes and the badge share a line
            assert buttons[0]["top"] < series["bottom"] and series["top"] < buttons[0]["bottom"]

        def in_strip(selector: str) -> bool:
            return bool(
                chart.call(
                    """(sel) => { const strip = document.getElementById('timeframes')
                          .getBoundingClientRect();
                        const b = document.querySelector(sel).getBoundingClientRect();
                        return b.left >= strip.left - 0.5 && b.right <= strip.right + 0.5; }""",
                    selector,
                )
            )

        assert in_strip('#timeframes [aria-pressed="true"]')
        assert not in_strip("#timeframes button:last-child")  # the strip scrolls
        # Tab reaches every button, and the focused one is scrolled into view
        chart.page.locator('#timeframes [aria-pressed="true"]').focus()
        for _ in range(4):  # 1d → 3d, 1w, 1M, then out of the strip
            chart.page.keyboard.press("Tab")
            if chart.call("() => document.activeElement.parentElement.id") != "timeframes":
                break
            assert in_strip("#timeframes button:focus"), chart.call(
                "() => document.activeElement.textContent"
            )
        chart.screenshot(f"chart-phone-15-timeframes-{width}x{height}")
